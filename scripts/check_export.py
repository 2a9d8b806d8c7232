"""Check an `ff export --format hf` folder against the run it came from, as a user would load it:
the plain-prompt test halves of the evaluation's question sets, each choice scored on its own row
(no tree packing, no ff code in the exported model's path), by the clean model, the hooked edit
(`pipelines.intervene.unlearned`) and the exported folder (`trust_remote_code=True`).

    python scripts/check_export.py --run ff-demo/runs/layer_4/featureforget --export ff-export

Prints, per set, accuracy clean / hooked / exported, the questions on which the exported and the
hooked answers differ, and the unlearning score 1 - acc_after / acc_before on the forget test
halves beside the one RUN/unlearning.json reports.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.models import load_model  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.data import load_mcq, sample_split  # noqa: E402
from pipelines.intervene import unlearned  # noqa: E402
from pipelines.result import EvalResult  # noqa: E402
from trainer.run import RunFolder  # noqa: E402


@torch.inference_mode()
def answers(model, tok, questions, template: str) -> torch.Tensor:
    """The index of each question's highest summed-log-likelihood choice [Q]."""
    dev = next(model.parameters()).device
    out = []
    for q in questions:
        prompt = tok(template.format(question=q.question))["input_ids"]
        scores = []
        for c in q.choices:
            cont = tok(" " + c, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + cont], device=dev)
            logits = model(ids, logits_to_keep=len(cont) + 1).logits[0, :-1]  # the positions predicting cont
            logp = logits.float().log_softmax(-1)
            scores.append(float(logp.gather(1, torch.tensor(cont, device=dev)[:, None]).sum()))
        out.append(max(range(len(scores)), key=scores.__getitem__))
    return torch.tensor(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, help="the run folder the export was made from")
    ap.add_argument("--export", required=True, help="the exported folder (ff export --format hf)")
    ap.add_argument("--preset", default="demo", help="evaluation preset whose question sets to use")
    ap.add_argument("--sets", default="forget_mcq,retain_mcq,ood_forget_mcq,ood_retain_mcq",
                    help="which of the evaluation's question sets to score (comma-separated)")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = EvalConfig.preset(args.preset)
    lm = load_model(RunFolder(args.run).run_config().model, device="cpu")
    exported = AutoModelForCausalLM.from_pretrained(args.export, trust_remote_code=True).eval()
    result = EvalResult.load(RunFolder(args.run).result)
    sets = [("forget_mcq", cfg.forget_mcq, "forget"), ("retain_mcq", cfg.retain_mcq, "retain"),
            ("ood_forget_mcq", cfg.ood_forget_mcq, "forget"), ("ood_retain_mcq", cfg.ood_retain_mcq, "retain")]
    acc = {}
    for name, spec, role in sets:
        if spec is None or name not in args.sets.split(","):
            continue
        qs, test_Q = sample_split(load_mcq(spec, role), cfg.max_questions, cfg.sample_seed)
        test = [q for q, t in zip(qs, test_Q.tolist()) if t]
        truth = torch.tensor([q.answer for q in test])
        t0 = time.perf_counter()
        clean = answers(lm.model, lm.tokenizer, test, cfg.mcq_template)
        with unlearned(lm.model, args.run):
            hooked = answers(lm.model, lm.tokenizer, test, cfg.mcq_template)
        got = answers(exported, lm.tokenizer, test, cfg.mcq_template)
        acc[name] = [float((a == truth).double().mean()) for a in (clean, hooked, got)]
        differ = int((got != hooked).sum())
        print(f"{name}: {len(test)} test questions, accuracy clean {acc[name][0]:.3f} hooked {acc[name][1]:.3f} "
              f"exported {acc[name][2]:.3f}; exported and hooked answers differ on {differ} "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    best = result.best
    for part, name in ((best, "forget_mcq"), (best.ood if best else None, "ood_forget_mcq")):
        if name not in acc:
            continue
        before, _, after = acc[name]
        reported = part.test.unlearning_score if part and part.test else None
        print(f"{name} unlearning score: exported {1 - after / before:.3f}; "
              f"RUN/unlearning.json {float('nan') if reported is None else reported:.3f}")


if __name__ == "__main__":
    main()
