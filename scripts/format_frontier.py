"""Which gate and which edit hold in every prompt format? A dev-half frontier over the format suite.

Usage (from the repository root, after `ff run --preset demo --out ff-demo`):

    .venv/bin/python scripts/format_frontier.py --run ff-demo/runs/layer_4/featureforget
    .venv/bin/python scripts/format_frontier.py --run RUN --windows none,16,24 --modes clamp100,ablate,project

Starting from the run's chosen setting (RUN/unlearning.json: features, detector), for each gate
window it calibrates the probe gate's threshold on the retain dev questions of *every* format
(pipelines/formats.py; `--percentile` of their highest windowed detector scores), then for each
edit form prints, per format, the dev-half unlearning score (forget) and retain accuracy ratio,
in and out of distribution, and the minimum over formats. Test halves never enter. With
`--fluency N` it also scores greedy continuations of N held-out forget and retain prose prompts
(pipelines/fluency.py).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cache.models import load_model  # noqa: E402
from pipelines.config import EvalConfig, Setting  # noqa: E402
from pipelines.evalsets import eval_data  # noqa: E402
from pipelines.evaluate import probe_thresholds  # noqa: E402
from pipelines.formats import parse_formats  # noqa: E402
from pipelines.intervene import Intervention, load_run, probe_layer, run_setting  # noqa: E402
from trainer.run import RunFolder  # noqa: E402


def edit_form(name: str) -> dict:
    """"clamp30", "ablate", "retain_mean", "project", each optionally ":N" (top N features);
    "nclamp30": the clamp with each edited residual rescaled to the clean one's norm (NormKept)."""
    head, _, n = name.partition(":")
    out: dict = {"top_n": int(n)} if n else {}
    if head.startswith("clamp"):
        return {**out, "mode": "clamp", "multiplier": float(head[5:])}
    if head.startswith("nclamp"):
        return {**out, "mode": "clamp", "multiplier": float(head[6:])}
    if head.startswith("steer"):  # the gate of a clamp; Steered replaces its edit
        return {**out, "mode": "clamp", "multiplier": float(head[5:])}
    return {**out, "mode": head}


def mean_difference(store: str, layer: int, chunks: int = 8) -> torch.Tensor:
    """[D] mean unlearn minus mean retain residual at `layer` over the first `chunks` chunks of
    each corpus of the store (BOS and padding left out)."""
    from cache.store import open_store

    st = open_store(store)
    means = []
    for name in ("retain", "unlearn"):
        c = st.corpus(name)
        total, n = torch.zeros(c.d_model, dtype=torch.float64), 0
        for i in range(min(chunks, c.n_chunks)):
            x = torch.from_numpy(c.read_chunk(layer, i)).double()
            m = torch.from_numpy(c.mask(*c.chunk_bounds(i)))
            total += x[m].sum(0)
            n += int(m.sum())
        means.append(total / n)
    return (means[1] - means[0]).float()


class Steered(Intervention):
    """Where the gate is open, h -> h - k * (mean unlearn - mean retain residual): the text pushed
    toward the general corpus along one direction, the SAE's features untouched (`steerK`)."""

    direction_D: torch.Tensor = torch.zeros(0)

    def edit(self, h_BTD, editable_BT=None, *args, **kwargs):
        out = super().edit(h_BTD, editable_BT, *args, **kwargs)
        open_BT = out.open_BT if editable_BT is None else out.open_BT & editable_BT.to(out.open_BT.device)
        k = self.setting.multiplier
        h = h_BTD - k * open_BT[..., None].to(h_BTD.dtype) * self.direction_D.to(h_BTD.device, h_BTD.dtype)
        return out._replace(h_BTD=h, changed_BT=open_BT)


class NormKept(Intervention):
    """The clamp with every edited position's residual rescaled to its clean norm: does keeping
    the residual's size keep the text fluent? (docs/results.md, "a norm-preserving clamp")."""

    def edit(self, h_BTD, *args, **kwargs):
        out = super().edit(h_BTD, *args, **kwargs)
        n0_BT1 = h_BTD.float().norm(dim=-1, keepdim=True)
        n1_BT1 = out.h_BTD.float().norm(dim=-1, keepdim=True).clamp_min(1e-6)
        h = torch.where(out.changed_BT[..., None], out.h_BTD.float() * n0_BT1 / n1_BT1, out.h_BTD.float())
        return out._replace(h_BTD=h.to(h_BTD.dtype))


def set_names(fmt: str, prefix: str, role: str) -> str:
    return f"{prefix}{role}_mcq" + ("" if fmt == "plain" else f"@{fmt}")


def two_stream_correct(es, model, iv: Intervention) -> torch.Tensor:
    """bool [Q]: each question answered as a two-stream edit would: every scored position reads
    the edited stream where the gate is open there, the clean model's output where it is shut
    (so a general question after a biology passage, its gate shut, is answered exactly as by the
    clean model, although the passage's keys and values were edited in the other stream)."""
    logprobs, _ = es.logprobs(model, iv)
    out = []
    for b, lp_N, clean_N, h_BTD, g_BTD in zip(es.batches, logprobs, es.clean, es.resid[iv.layer], es.gate_resid(iv)):
        open_BT = iv.edit(h_BTD, b.editable_BT, b.seg_BT, gate_h_BTD=g_BTD).open_BT
        out.append(torch.where(open_BT[b.row_N, b.col_N], lp_N, clean_N))
    return es.correct(out)


def dev_table(data, model, iv: Intervention, formats, two_stream: bool = False) -> dict:
    out = {}
    for fmt in formats:
        row = {}
        for prefix in ("", "ood_"):
            f_set, r_set = (getattr(data, set_names(fmt, prefix, r)) for r in ("forget", "retain"))
            fc, rc = f_set.clean_result().correct_Q, r_set.clean_result().correct_Q
            if two_stream:
                fa, ra = two_stream_correct(f_set, model, iv), two_stream_correct(r_set, model, iv)
            else:
                fa, ra = f_set.run(model, iv).correct_Q, r_set.run(model, iv).correct_Q
            dev_f, dev_r = ~f_set.test_Q, ~r_set.test_Q
            f0, f1 = fc[dev_f].double().mean().item(), fa[dev_f].double().mean().item()
            r0, r1 = rc[dev_r].double().mean().item(), ra[dev_r].double().mean().item()
            opened = float((f_set.gate_peaks(iv)[dev_f] > iv.threshold).double().mean())
            r_open = float((r_set.gate_peaks(iv)[dev_r] > iv.threshold).double().mean())
            row[prefix or "in"] = {"score": 1 - f1 / f0 if f0 else None, "forget": (f0, f1), "retain": (r0, r1),
                                   "open_f": opened, "open_r": r_open}
        out[fmt] = row
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="A run folder (ff train); its unlearning.json's setting is the base.")
    ap.add_argument("--formats", default="all", help="Prompt formats (pipelines/formats.py), comma-separated, or all.")
    ap.add_argument("--format-questions", type=int, default=60, help="Questions per set and format (half dev).")
    ap.add_argument("--windows", default="none,16,24,32", help="Gate windows in tokens; none: from the start.")
    ap.add_argument("--modes", default="clamp100,clamp10,ablate,retain_mean,project",
                    help="Edit forms: clampM, nclampM (norm kept), steerK (minus K times the mean difference of the "
                         "corpora), ablate, retain_mean, project, each optionally :N (top N features).")
    ap.add_argument("--percentile", type=float, default=99.0,
                    help="The threshold's percentile of the retain dev questions' peaks (every format but after_bio).")
    ap.add_argument("--top-n", type=int, default=None, help="Override the chosen setting's feature count.")
    ap.add_argument("--selection", default=None, help="Override the chosen setting's selection rule.")
    ap.add_argument("--fluency", type=int, default=0, help="Prose prompts per side for the fluency metric.")
    ap.add_argument("--store", default=None, help="steerK: the store of the mean difference (default: the run's).")
    ap.add_argument("--two-stream", action="store_true",
                    help="Score each position from the edited stream where the gate is open there, else from the clean "
                         "model (two_stream_correct); fluency is still the one-stream edit's.")
    ap.add_argument("--json", default=None, help="Also write the table here.")
    args = ap.parse_args()
    formats = parse_formats(args.formats)
    run = load_run(args.run)
    if RunFolder(run.path).result.is_file():
        base = run_setting(run.path).replace(gate_threshold=None)
    else:  # the demo's choice (README): SAEBench rule, top 200, probe gate p99, network detector
        base = Setting(mode="clamp", multiplier=100.0, top_n=200, selection="saebench", gate="probe",
                       probe_kind="mlp", gate_percentile=99.0)
    if args.top_n:
        base = base.replace(top_n=args.top_n)
    if args.selection:
        base = base.replace(selection=args.selection)
    lm = load_model(run.config.model, device="cpu")
    cfg = EvalConfig.preset("demo").replace(formats=formats, format_questions=args.format_questions)
    data = eval_data(lm, cfg)
    t0 = time.time()
    data.prepare(lm.model, sorted({run.layer, probe_layer(run)[0]}))
    print(f"clean passes: {time.time() - t0:.0f} s; base setting {base.label}", flush=True)
    results, direction = [], None
    for w in args.windows.split(","):
        window = None if w == "none" else int(w)
        probe = Intervention(run, base.replace(gate_window=window, gate_threshold=0.0))
        thr = probe_thresholds(run, data, probe.setting, {args.percentile}, args.percentile)[0][args.percentile]
        print(f"window {window}: threshold {thr:.3f} (probe window {probe.window})", flush=True)
        for name in args.modes.split(","):
            s = base.replace(gate_window=window, gate_threshold=thr, **edit_form(name))
            kind = NormKept if name.startswith("nclamp") else Steered if name.startswith("steer") else Intervention
            iv = kind(run, s)
            if kind is Steered:
                iv.direction_D = direction if direction is not None else mean_difference(
                    args.store or str(run.config.store), run.layer)
                direction = iv.direction_D
            t1 = time.time()
            table = dev_table(data, lm.model, iv, formats, two_stream=args.two_stream)
            entry = {"window": window, "mode": name, "threshold": thr, "two_stream": args.two_stream, "table": table}
            if args.fluency:
                entry["fluency"] = fluency(lm, run, iv, args.fluency)
            results.append(entry)
            print_entry(entry, time.time() - t1)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


_REF: dict = {}


def fluency(lm, run, iv: Intervention, n: int) -> dict:
    from cache.corpora import DEMO_DIR
    from pipelines.fluency import clean_reference, fluency_prompts, measure_fluency

    out = {}
    for side, fname in (("forget", "unlearn_heldout.txt"), ("retain", "retain_heldout.txt"),
                        ("ood_forget", "ood_forget_text.txt"), ("ood_retain", "ood_retain_text.txt")):
        paras = [p for p in (DEMO_DIR / fname).read_text().split("\n") if p.strip()]
        if side not in _REF:
            ids = fluency_prompts(lm.tokenizer, paras, n_prompts=n, prompt_tokens=12)
            _REF[side] = (ids, clean_reference(lm.model, lm.tokenizer, ids, 32))
        ids, ref = _REF[side]
        fl = measure_fluency(lm.model, lm.tokenizer, ids, lambda: iv.hooked(lm.model), clean_cont=ref)
        out[side] = fl.to_dict()
    return out


def print_entry(e: dict, secs: float) -> None:
    t = e["table"]
    mins = {k: min((r[k]["score"] or 0) for r in t.values()) for k in ("in", "ood_")}
    print(f"\n== window {e['window']} {e['mode']} thr {e['threshold']:.3f}: min dev score in {mins['in']:.2f} "
          f"ood {mins['ood_']:.2f} ({secs:.0f} s)")
    for fmt, r in t.items():
        cells = []
        for k in ("in", "ood_"):
            c = r[k]
            cells.append(f"{k:4s} score {c['score']:.2f} f {c['forget'][0]:.2f}->{c['forget'][1]:.2f} "
                         f"r {c['retain'][0]:.2f}->{c['retain'][1]:.2f} open f {c['open_f']:.2f} r {c['open_r']:.2f}")
        print(f"  {fmt:10s} " + " | ".join(cells))
    for side, f in (e.get("fluency") or {}).items():
        print(f"  fluency {side}: nll {f['nll']:.2f} (clean {f['nll_clean']:.2f}) distinct {f['distinct']:.2f} "
              f"changed {f['changed']:.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
