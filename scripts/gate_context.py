"""Does the probe gate follow the topic when a question comes after other text?

Usage (from the repository root, after `ff run --preset demo --out ff-demo`):

    .venv/bin/python scripts/gate_context.py --run ff-demo/runs/layer_4/featureforget
    .venv/bin/python scripts/gate_context.py --run RUN --windows none,24,32,48 --words 60

For the dev half of the bundled forget and retain questions (the split `ff eval` uses), it puts
a preamble before each question: nothing, the first `--words` words of a bundled general
passage, or of a bundled biology passage (cache/demo_data/ood_*_text.txt, prose the training
corpora do not contain), and prints on what share of the questions the run's chosen probe gate
(threshold and detector from RUN/unlearning.json) is open at the question's last token
("Answer:"), where the answer is read, for each gate window. A gate that averages from the
start is diluted by a general preamble (it stays shut on the forget question) and carried by a
biology one (it opens on the general question); a window follows the question.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.corpora import DEMO_DIR  # noqa: E402
from cache.models import load_model  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.data import load_mcq, sample_split  # noqa: E402
from pipelines.errors import EvalError  # noqa: E402
from pipelines.intervene import Intervention, load_run, run_setting  # noqa: E402
from trainer.gate.causal import firing_share, gate_open  # noqa: E402


def passages(name: str) -> list[str]:
    return [p.strip() for p in (DEMO_DIR / name).read_text().split("\n") if p.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="A run folder with an unlearning.json (ff run / ff eval --save).")
    ap.add_argument("--windows", default="none,24,32,48",
                    help="Gate windows to compare (tokens; none: from the start).")
    ap.add_argument("--words", type=int, default=60, help="Words of preamble before each question.")
    ap.add_argument("--preamble", action="append", default=[], metavar="TEXT",
                    help="Also try this text before every question (repeatable; \\n for a newline).")
    ap.add_argument("--sample-seed", type=int, default=0, help="The dev/test split's seed (ff eval --sample-seed).")
    args = ap.parse_args()
    try:
        windows = [None if w.strip() == "none" else int(w) for w in args.windows.split(",")]
    except EvalError as e:  # one line, not a traceback
        sys.exit(f"error: {e}")
    run = load_run(args.run)
    setting = run_setting(run.path)
    if setting.gate != "probe" or setting.gate_threshold is None:
        sys.exit(f"error: {args.run}: the chosen setting is not a calibrated probe gate ({setting.label})")
    iv = Intervention(run, setting.replace(gate_window=None))
    lm = load_model(run.config.model, device="cpu")
    tok, model = lm.tokenizer, lm.model
    general, biology = passages("ood_retain_text.txt"), passages("ood_forget_text.txt")
    preambles = {"none": lambda i: "",
                 "general": lambda i: " ".join(general[i % len(general)].split()[:args.words]) + "\n\n",
                 "biology": lambda i: " ".join(biology[i % len(biology)].split()[:args.words]) + "\n\n"}
    for k, text in enumerate(args.preamble):
        preambles[f"--preamble {k + 1}"] = lambda i, t=text.replace("\\n", "\n"): t
    print(f"run {args.run}: {setting.label}; dev half, gate open at the question's last token, "
          f"preamble of {args.words} words")
    print("questions | preamble | " + " | ".join(f"window {w or 'none'}" for w in windows))
    print("|".join(["---"] * (2 + len(windows))))
    template = EvalConfig().mcq_template  # the format ff eval scores the bundled questions in
    for role in ("forget", "retain"):
        questions = load_mcq("demo", role)
        sampled, test_Q = sample_split(questions, None, args.sample_seed)
        dev = [q for q, t in zip(sampled, test_Q.tolist()) if not t]
        for name, pre in preambles.items():
            opened = {w: 0 for w in windows}
            for i, q in enumerate(dev):
                ids = tok(pre(i) + template.format(question=q.question), return_tensors="pt").input_ids
                with torch.no_grad():
                    h = model(ids, output_hidden_states=True).hidden_states[iv.gate_layer + 1]
                editable = ids != model.config.bos_token_id
                signal = iv.signal(h)
                for w in windows:
                    share, seen = firing_share(signal, editable, window=w)
                    opened[w] += bool(gate_open(share, seen, iv.threshold)[0, -1])
            print(f"{role} ({len(dev)}) | {name} | " + " | ".join(f"{opened[w] / len(dev):.2f}" for w in windows),
                  flush=True)


if __name__ == "__main__":
    main()
