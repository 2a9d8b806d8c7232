"""A baked folder's change to the residual stream, applied only where the run's gate is open.

Usage (from the repository root, after `ff run --preset demo --out ff-demo` and `ff bake`):

    .venv/bin/python scripts/baked_gate.py --run ff-demo/runs/layer_4/featureforget --baked ff-baked

`ff bake` trains a low-rank update of blocks 0..L whose output at block L approximates the run's
edit from the tokens alone; it forgets fluently (its continuations of biology prose stay English)
but acts on every text a little. This script measures the two combined: at block L the residual
is the baked model's where the run's chosen gate (its probe, window and threshold, unchanged) is
open, the clean model's elsewhere:

    h_L'(t) = h_L^baked(t) if gate(t) else h_L(t)

with the clean blocks above L (a two-stream forward over blocks 0..L, one stream above). It prints,
per prompt format, the unlearning score and the retain accuracy ratio on the dev and test halves,
in and out of distribution, the held-out text CE, and the fluency of greedy continuations of
held-out prose (the prompts `ff eval` uses; with the baked residual, each step recomputed in full).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.capture import outputs_at  # noqa: E402
from cache.models import load_model  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.evalsets import FLUENCY_NEW_TOKENS, eval_data  # noqa: E402
from pipelines.fastlm import resid_at  # noqa: E402
from pipelines.fluency import continuation_nll, summarize  # noqa: E402
from pipelines.formats import parse_formats  # noqa: E402
from pipelines.intervene import Edited, Intervention, load_run, probe_layer, run_setting  # noqa: E402
from pipelines.scoring import paired_difference  # noqa: E402


class BakedGate(Intervention):
    """The run's gate, deciding where the baked model's residual replaces the clean one. The baked
    residual of the tensor being edited is looked up by its storage (the evaluation's cached clean
    residuals), else taken from `current` (set before each forward of a generation)."""

    lookup: dict[int, torch.Tensor]
    current: torch.Tensor | None = None
    everywhere: bool = False
    """True: the baked residual at every editable position (the baked model itself, blocks above L
    being unchanged by a bake)."""

    def edit(self, h_BTD, editable_BT=None, seg_BT=None, start=None, gate_h_BTD=None) -> Edited:
        gated = super().edit(h_BTD, editable_BT, seg_BT, start, gate_h_BTD)
        baked = self.lookup.get(h_BTD.data_ptr(), self.current)
        if baked is None or baked.shape != h_BTD.shape:
            raise RuntimeError("no baked residual for this forward")
        open_BT = torch.ones_like(gated.open_BT) if self.everywhere else gated.open_BT
        if editable_BT is not None:
            open_BT = open_BT & editable_BT.to(open_BT.device)
        h = torch.where(open_BT[..., None], baked.to(h_BTD.dtype), h_BTD)
        return Edited(h, open_BT & (baked != h_BTD).any(-1), gated.open_BT, gated.signal_BT)


def attach_baked(data, baked_model, iv: BakedGate) -> None:
    iv.lookup = {}
    for s in data.sets:
        for b, h_BTD in zip(s.batches, s.resid[iv.layer]):
            iv.lookup[h_BTD.data_ptr()] = resid_at(baked_model, b, [iv.layer])[iv.layer].cpu()


@torch.inference_mode()
def generate(model, baked_model, iv: BakedGate, ids_PT: torch.Tensor, n_new: int) -> torch.Tensor:
    """Greedy continuations with the baked residual behind the gate, every step recomputed over
    the whole sequence by both models (the gate is causal: this is what KV-cached decoding sees)."""
    seq = ids_PT
    with iv.hooked(model):
        for _ in range(n_new):
            mask = torch.ones_like(seq)
            iv.current = outputs_at(baked_model, seq, mask, [iv.layer])[iv.layer]
            logits = model(input_ids=seq, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
            seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    iv.current = None
    return seq[:, ids_PT.shape[1]:]


def fluency(data, lm, iv: Intervention, baked_model) -> dict:
    """{text set: Fluency as a dict} on the prose prompts `ff eval` uses: a hooked edit through the
    evaluation's own path, the baked residual behind the gate through `generate`."""
    if baked_model is None:
        return {n: f.to_dict() for n, f in data.fluency_of(lm.model, lm.tokenizer, iv).items()}
    data.fluency_of(lm.model, lm.tokenizer, None)  # the clean model's continuations, once
    out = {}
    for name, ids in data.fluency.items():
        cont = generate(lm.model, baked_model, iv, ids, FLUENCY_NEW_TOKENS)
        out[name] = summarize(lm.tokenizer, ids, cont, continuation_nll(lm.model, ids, cont),
                              data.fluency_ref[name]).to_dict()
    return out


def table(data, model, iv, formats, answers: dict | None = None) -> dict:
    """Per format and side, (clean, edited accuracy, questions) of each half; the text sets' CE.
    `answers`: filled with the plain format's forget answers [Q] per side, for `paired`."""
    out = {}
    for fmt in formats:
        for prefix in ("", "ood_"):
            cells = {}
            for role in ("forget", "retain"):
                s = getattr(data, f"{prefix}{role}_mcq" + ("" if fmt == "plain" else f"@{fmt}"))
                c0, c1 = s.clean_result().correct_Q, s.run(model, iv).correct_Q
                if answers is not None and fmt == "plain" and role == "forget":
                    answers[prefix or "in_"] = (c0, c1, s.test_Q)
                for half, pick in (("dev", ~s.test_Q), ("test", s.test_Q)):
                    cells[f"{role}_{half}"] = (c0[pick].double().mean().item(), c1[pick].double().mean().item(),
                                               int(pick.sum()))
            out[f"{fmt}/{prefix or 'in_'}"] = cells
    for name in ("retain_text", "ood_retain_text", "forget_text", "ood_forget_text"):
        s = getattr(data, name)
        out[name] = (s.clean_value(), s.run(model, iv).value)
    return out


def show(label: str, t: dict, fl: dict | None) -> None:
    print(f"\n== {label}")
    mins = {}
    for key, c in t.items():
        if "/" not in key:
            print(f"  {key}: CE {c[0]:.3f} -> {c[1]:.3f} ({c[1] / c[0] - 1:+.1%})")
            continue
        parts = []
        for half in ("dev", "test"):
            f0, f1, n = c[f"forget_{half}"]
            r0, r1, _ = c[f"retain_{half}"]
            score = 1 - f1 / f0 if f0 else float("nan")
            mins.setdefault((key.split("/")[1], half), []).append(score)
            parts.append(f"{half} score {score:+.2f} (n {n}) retain {r0:.2f}->{r1:.2f}")
        print(f"  {key:18s} " + " | ".join(parts))
    for (side, half), v in sorted(mins.items()):
        print(f"  min over formats {side} {half}: {min(v):+.2f}  mean {sum(v) / len(v):+.2f}")
    for side, f in (fl or {}).items():
        print(f"  fluency {side}: nll {f['nll']:.2f} (clean {f['nll_clean']:.2f}) distinct {f['distinct']:.2f} "
              f"changed {f['changed']:.2f}")
    sys.stdout.flush()


def paired(answers: dict, ref: str) -> None:
    """Each entry's plain-format score minus the first entry's, on the same questions (paired
    bootstrap over questions, pipelines.scoring.paired_difference), per side and half."""
    base = answers[ref]
    for label, sides in answers.items():
        if label == ref:
            continue
        cells = []
        for side, (c0, c1, test_Q) in sides.items():
            for half, pick in (("dev", ~test_Q), ("test", test_Q)):
                got = paired_difference(c0[pick], c1[pick], base[side][1][pick], n=4000)  # entry minus ref
                if got is not None:
                    d, (lo, hi) = got
                    cells.append(f"{side}{half} {d:+.3f} [{lo:+.2f}, {hi:+.2f}]")
        print(f"  plain score, {label} minus {ref}: " + "  ".join(cells))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="A run folder with a chosen setting (its gate is used).")
    ap.add_argument("--baked", nargs="*", default=[], help="Baked folders (ff bake) of that run.")
    ap.add_argument("--everywhere", action="store_true",
                    help="Also score each baked folder's residual at every position (the baked model as it is).")
    ap.add_argument("--clamps", default="", help="References: the run's setting as a clamp of these "
                                                   "strengths (comma-separated), the same gate, hooked.")
    ap.add_argument("--formats", default="all", help="Prompt formats, comma-separated, or all.")
    ap.add_argument("--format-questions", type=int, default=24, help="Questions per set and format (half dev).")
    ap.add_argument("--fluency", type=int, default=16, help="Prose prompts per held-out text set (0: none).")
    ap.add_argument("--json", default=None, help="Also write the tables here.")
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM

    formats = parse_formats(args.formats)
    run = load_run(args.run)
    setting = run_setting(run.path)
    lm = load_model(run.config.model, device="cpu")
    cfg = EvalConfig.preset("demo").replace(formats=formats, format_questions=args.format_questions,
                                            fluency_prompts=max(args.fluency, 1))
    data = eval_data(lm, cfg)
    t0 = time.time()
    data.prepare(lm.model, sorted({run.layer, probe_layer(run)[0]}))
    print(f"clean passes {time.time() - t0:.0f} s; gate of {setting.label}", flush=True)
    results, answers = {}, {}

    def measure(label: str, iv: Intervention, baked) -> None:
        t1 = time.time()
        answers[label] = {}
        t = table(data, lm.model, iv, formats, answers[label])
        fl = fluency(data, lm, iv, baked) if args.fluency else None
        results[label] = {"table": t, "fluency": fl}
        show(f"{label} ({time.time() - t1:.0f} s)", t, fl)

    for m in filter(None, args.clamps.split(",")):
        measure(f"clamp m = {float(m):g}, hooked", Intervention(run, setting.replace(multiplier=float(m))), None)
    for folder in args.baked:
        baked = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        iv = BakedGate(run, setting)
        attach_baked(data, baked, iv)
        measure(f"{folder}, gated", iv, baked)
        if args.everywhere:
            iv.everywhere = True
            measure(f"{folder}, everywhere", iv, baked)
        del baked, iv
    if len(answers) > 1:
        print("\n== paired differences (plain format)")
        paired(answers, next(iter(answers)))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
