"""Evaluation benchmark: what one sweep setting costs against the forward it must run, and the
whole `ff eval` of a run against the same evaluation without the reuse (STYLE habit 11: ratios
measured in one run, not timed tests).

    python benchmarks/bench_eval.py --run ff-demo/runs/layer_4/featureforget
    python benchmarks/bench_eval.py --run ff-demo/runs/layer_4/featureforget --whole

Per setting (the run's sweep under the chosen preset, probe gates calibrated on the dev halves
as `ff eval` does), rounds interleaved:
- ours: the setting's measurement as the sweep runs it (every question set in every prompt
  format), rerunning each changed row only from its first edited position on, from the clean
  keys and values the clean pass kept (EvalConfig.kv_cache_gib);
- whole rows: the same measurement rerunning each changed row whole from the edited layer
  (kv_cache_gib 0: the path without the kept keys and values);
- bare: the plain forward of the blocks above the edited layer over the same changed rows,
  whole (no edit, no LM head, no bookkeeping): the least any rerun of those rows costs.
Printed: seconds, ours / bare (target <= 1.3), whole rows / bare, whether ours and the
whole-row path give the same answers (every question's correctness, every format), and the
tokens each path ran through the blocks above the layer.

--whole: instead, the whole evaluation of the runs (`--run` given once per run, as `ff run`
evaluates them: one clean pass shared by all), timed two ways in this process, each with its own
clean pass: as `ff eval` runs it, and without reuse (EvalConfig.reuse=false: every setting runs
the whole model over every row of every set, the chosen settings are measured again, every
fluency continuation is scored: what each setting cost before the reuse). Printed: the seconds
of each run and in all, the ratio (target <= 0.5), and whether the two results are equal in
every field but timings, rows rerun and the config (checked; CE values compared at 5 places).

    python benchmarks/bench_eval.py --whole --run ff-demo/runs/layer_4/featureforget \
        --run ff-demo/runs/layer_4/baseline
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _strip(x, path=""):
    """The result without its timing fields (seconds, cpu_seconds), floats rounded to 5 places."""
    if isinstance(x, dict):
        return {k: _strip(v, f"{path}.{k}") for k, v in x.items()
                if k not in ("seconds", "cpu_seconds", "rows_rerun", "config")}
    if isinstance(x, list):
        return [_strip(v, path) for v in x]
    if isinstance(x, float):
        return round(x, 5)
    return x


def _diff(a, b, path=""):
    """The first path where two stripped results differ, or None."""
    if type(a) is not type(b):
        return path
    if isinstance(a, dict):
        for k in sorted(set(a) | set(b)):
            if k not in a or k not in b:
                return f"{path}.{k}"
            d = _diff(a[k], b[k], f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list):
        if len(a) != len(b):
            return path
        for i, (x, y) in enumerate(zip(a, b)):
            d = _diff(x, y, f"{path}[{i}]")
            if d:
                return d
        return None
    return None if a == b else path


def bare_rows(model, data, iv) -> float:
    """Seconds of the plain forward of the blocks after iv.layer over the rows `iv` changes."""
    from pipelines.evalsets import rerun_rows
    from pipelines.fastlm import final_hidden

    t = 0.0
    for es in data.sets:
        if not es.is_mcq:
            continue
        for b, h_BTD, g_BTD in zip(es.batches, es.resid[iv.layer], es.gate_resid(iv)):
            ed = iv.edit(h_BTD, b.editable_BT, b.seg_BT, gate_h_BTD=g_BTD)
            _, rows_R = rerun_rows(b, ed.changed_BT)
            if len(rows_R) == 0:
                continue
            sub, _ = b.select(rows_R)
            h_RTD = h_BTD[rows_R, : sub.input_ids_BT.shape[1]]
            t0 = time.perf_counter()
            final_hidden(model, sub, resume=(iv.layer, h_RTD))
            t += time.perf_counter() - t0
    return t


def per_setting(args, lm, cfg) -> None:
    from pipelines.evalsets import eval_data
    from pipelines.evaluate import _SETS, METRICS, OOD_METRICS, calibrate_probe, measure
    from pipelines.fastlm import kv_reuse_ok, verify_fast_path
    from pipelines.intervene import Intervention, load_run, probe_layer

    run = load_run(args.run[0])
    run.sae.to(lm.device)
    verify_fast_path(lm.model, run.layer)
    data = eval_data(lm, cfg)
    t = time.perf_counter()
    data.prepare(lm.model, sorted({run.layer, probe_layer(run)[0]}),
                 kv_above=run.layer if kv_reuse_ok(lm.model, run.layer) else None)
    kept = data.forget_mcq.kv is not None
    nbytes = sum(k.nbytes + v.nbytes for es in data.sets for d in (es.kv or []) for k, v in d.values())
    print(f"clean pass {time.perf_counter() - t:.1f} s; keys and values kept: {kept} "
          f"({nbytes / 2**30:.2f} GiB)", flush=True)
    if not kept:
        raise SystemExit("the clean keys and values were not kept (model unsupported or over --kv-cache-gib)")
    clean = {m: getattr(data, _SETS[m]).clean_result() for m in METRICS + OOD_METRICS if data.has(_SETS[m])}
    metrics = tuple(m for m in clean if m.endswith("_mcq"))
    settings = [s for s in calibrate_probe(cfg.grid.settings(run.method), run, data, cfg) if s.edits_features]
    if args.match:
        settings = [s for s in settings if any(m in s.label for m in args.match.split(","))]
    settings = settings[: args.settings] if args.settings else settings
    kv = {es.name: (es.kv, es.kv_above) for es in data.sets}

    tokens = {}

    def timed_measure(iv, name, keep):
        for es in data.sets:
            es.kv, es.kv_above = kv[es.name] if keep else (None, None)
            es.tokens_rerun = 0
        out = measure(data, lm.model, iv, clean, metrics, formats="all")
        tokens[name] = sum(es.tokens_rerun for es in data.sets)
        return out

    def ours(iv):
        return timed_measure(iv, "ours", True)

    def whole(iv):
        return timed_measure(iv, "whole", False)

    print(f"{'setting':<72} {'ours s':>7} {'whole s':>8} {'bare s':>7} {'ours/bare':>9} {'whole/bare':>10} same")
    ratios = []
    for s in settings:
        iv = Intervention(run, s)
        best = {"ours": float("inf"), "whole": float("inf"), "bare": float("inf")}
        res = {}
        for _ in range(args.rounds):
            for name, fn in (("ours", ours), ("whole", whole), ("bare", None)):
                t = time.perf_counter()
                if fn is None:
                    dt = bare_rows(lm.model, data, iv)
                else:
                    res[name] = fn(iv)
                    dt = time.perf_counter() - t
                best[name] = min(best[name], dt)
        same = all(torch.equal(x[1], y[1]) for k in res["ours"].correct
                   for x, y in zip(res["ours"].correct[k][:2], res["whole"].correct[k][:2]))
        ratios.append(best["ours"] / best["bare"])
        print(f"{s.label:<72} {best['ours']:>7.1f} {best['whole']:>8.1f} {best['bare']:>7.1f} "
              f"{best['ours'] / best['bare']:>9.2f} {best['whole'] / best['bare']:>10.2f} {same} "
              f"(tokens through the upper blocks: ours {tokens['ours']:,}, whole rows {tokens['whole']:,})",
              flush=True)
    for es in data.sets:
        es.kv, es.kv_above = kv[es.name]
    print(f"median ours / bare over {len(ratios)} settings: {sorted(ratios)[len(ratios) // 2]:.2f} (target <= 1.3)")


def whole_eval(args, lm, cfg) -> None:
    from pipelines.evaluate import evaluate_run

    seconds, results = {}, {}
    for name, c in (("ff eval", cfg), ("without reuse", cfg.replace(reuse=False))):
        for run in args.run:
            t = time.perf_counter()
            results[name, run] = evaluate_run(run, lm, c, progress=False)
            seconds[name, run] = time.perf_counter() - t
            print(f"evaluate_run {run}, {name}: {seconds[name, run]:.0f} s", flush=True)
            if args.out:  # e.g. to compare with the run's unlearning.json
                out = Path(args.out) / f"{Path(run).name}-{'reuse' if c.reuse else 'no-reuse'}.json"
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results[name, run].to_dict(), indent=1))
    total = {name: sum(v for (n, _), v in seconds.items() if n == name) for name in ("ff eval", "without reuse")}
    print(f"whole evaluation: ff eval {total['ff eval']:.0f} s, without reuse {total['without reuse']:.0f} s, "
          f"ratio {total['ff eval'] / total['without reuse']:.2f} (target <= 0.5)")
    for run in args.run:
        d = _diff(*(_strip(results[name, run].to_dict()) for name in ("ff eval", "without reuse")))
        print(f"{run}: " + ("results equal (up to timing fields, rows rerun and CE rounding at 5 places)"
                            if d is None else f"results DIFFER at {d}"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", required=True, action="append",
                    help="a trained run folder (ff train / ff run); --whole: once per run to evaluate")
    ap.add_argument("--model", default=None, help="model name or path (default: the run's)")
    ap.add_argument("--preset", default="demo", help="evaluation preset (demo, full)")
    ap.add_argument("--settings", type=int, default=0, help="time only the first N settings (0: all)")
    ap.add_argument("--match", default="", help="only settings whose label contains one of these (comma-separated)")
    ap.add_argument("--gates", default="", help="gates to sweep instead of the preset's (e.g. none,probe)")
    ap.add_argument("--multipliers", default="", help="static clamp strengths instead of the preset's (e.g. 100)")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds per setting (best kept)")
    ap.add_argument("--whole", action="store_true",
                    help="time the whole evaluation of the runs with and without reuse (instead of per setting)")
    ap.add_argument("--out", default=None, help="--whole: write each result as JSON into this folder")
    args = ap.parse_args()
    if len(args.run) > 1 and not args.whole:
        ap.error("--run once per setting benchmark (several runs only with --whole)")

    from cache.models import load_model
    from pipelines.config import EvalConfig
    from pipelines.intervene import load_run

    torch.set_num_threads(max(1, torch.get_num_threads()))
    lm = load_model(args.model or load_run(args.run[0]).config.model)
    cfg = EvalConfig.preset(args.preset)
    grid = cfg.grid
    if args.gates:
        grid = replace(grid, gates=tuple(args.gates.split(",")))
    if args.multipliers:
        grid = replace(grid, multipliers=tuple(float(m) for m in args.multipliers.split(",")))
    cfg = cfg.replace(grid=grid)
    if args.whole:
        whole_eval(args, lm, cfg)
    else:
        per_setting(args, lm, cfg)


if __name__ == "__main__":
    main()
