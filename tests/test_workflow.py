"""`ff run` end to end on the tiny model: cache, train both methods, evaluate, report; rerun reuses."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main
from pipelines.report import markdown_table, verdict
from pipelines.result import EvalResult


def test_ff_run_end_to_end_and_resume(tmp_path, tiny_model, tiny_corpora, monkeypatch):
    from trainer import config

    monkeypatch.setitem(config.PRESETS, "demo", {**config.PRESETS["demo"], "steps": 60, "warmup": 5,
                                                  "recluster_every": 10, "checkpoint_every": 20})
    out = tmp_path / "demo"
    args = ["run", "--preset", "demo", "--out", str(out), "--set", f"model={tiny_model}", "--set", "layers=1",
            "--set", "contexts=48", "--quiet"]
    from pipelines import workflow

    # the tiny corpora instead of the bundled ones (the tiny tokenizer knows only their words)
    orig = workflow.PRESETS["demo"]
    from dataclasses import replace

    workflow.PRESETS["demo"] = replace(orig, cache=replace(orig.cache, retain=tiny_corpora[0], unlearn=tiny_corpora[1]),
                                       eval={"max_questions": 16, "max_text_tokens": 256, "ood_forget_mcq": None,
                                             "ood_retain_mcq": None, "ood_forget_text": None, "ood_retain_text": None,
                                             "bootstrap": 100})
    try:
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0, r.output
        report = out / "report"
        for name in ("report.md", "report.json", "fig_unlearning_score.png", "fig_training_loss.png",
                     "fig_importance.png", "fig_tradeoff.png"):
            assert (report / name).is_file() and (report / name).stat().st_size > 0, name
            if name.endswith(".png"):
                assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        rep = json.loads((report / "report.json").read_text())
        assert set(rep["results"]) == {"featureforget", "baseline"}
        for method in ("featureforget", "baseline"):
            res = rep["results"][method]["1"]
            assert res["layer"] == 1 and res["method"] == method and res["sweep"]
        md = (report / "report.md").read_text()
        assert "| 1 | FeatureForget, probe-gated |" in md and "| 1 | baseline SAE, probe-gated |" in md
        assert "## Verdict" in md
        assert "static |" not in md  # the demo sweeps the probe gate only
        # the preset's probe reads the layer before the trained one: both cached, one trained
        from safetensors.torch import load_file

        from cache.store import open_store
        assert list(open_store(out / "store.zarr").meta.layers) == [0, 1] and rep["layers"] == [1]
        assert sorted(d.name for d in (out / "runs").iterdir()) == ["layer_1"]
        for method in ("featureforget", "baseline"):
            assert int(load_file(str(out / "runs" / "layer_1" / method / "gate.safetensors"))["probe/layer"][0]) == 0

        stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
        r = CliRunner().invoke(main, args)  # everything is reused
        assert r.exit_code == 0, r.output
        assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    finally:
        workflow.PRESETS["demo"] = orig


def typed(results):
    """Hand-built result dicts (the JSON of unlearning.json) as the report reads them."""
    return {m: {layer: EvalResult.from_dict(r) for layer, r in by.items()} for m, by in results.items()}


def typed_seeds(seeds):
    return {m: {layer: [EvalResult.from_dict(r) for r in rs] for layer, rs in by.items()} for m, by in seeds.items()}


def _best(score, ci=None, fb=0, fa=0, rb=0, ra=0):
    if score is None:
        return {"best": None, "reason": "no retain-safe setting: ..."}
    half = {"unlearning_score": score, "ci95": ci, "correct_subset_score": score,
            "forget_mcq": {"before": fb, "after": fa}, "retain_mcq": {"before": rb, "after": ra}}
    return {"best": {"label": "clamp m=10 top20 candidates gate p95", "setting": {"mode": "clamp"}, "test": half,
                     "dev": half, "forget_loss": {"before": 2.0, "after": 2.5},
                     "retain_loss": {"before": 2.0, "after": 2.01},
                     "gate": {"open_rate_retain": 0.05, "open_rate_forget": 0.9},
                     "selection": {"auroc_text": 0.95, "auroc_mcq": 0.8}}, "reason": None}


def _res(static, gated):
    return {"best_by_gate": {"none": _best(*static), "sequence": _best(*gated)}, "sweep": [],
            "sae": {"fvu": 0.4, "l0": 25.0, "dead_fraction": 0.1, "loss_recovered": None}}


def test_report_table_and_verdict():
    results = {"featureforget": {8: _res((0.2, [0.1, 0.3], 0.8, 0.64, 0.7, 0.7),
                                         (0.6, [0.5, 0.7], 0.8, 0.32, 0.7, 0.7))},
               "baseline": {8: _res((None,), (0.2, [0.1, 0.35], 0.8, 0.64, 0.7, 0.7))}}
    table = markdown_table(typed(results))
    assert "| 8 | FeatureForget, gated | clamp m=10 top20 candidates gate p95 | 0.600 [0.50, 0.70] | 0.600 | " \
           "0.80 -> 0.32 | 0.70 -> 0.70 | 2.00 -> 2.50 (+25.0%) | 2.00 -> 2.01 (+0.5%) | 0.05 / 0.90 | 0.95 / 0.80 | " \
           "0.95 / 0.80 |" in table  # the sequence gate reads the selected features
    probe = results["featureforget"][8]["best_by_gate"]["sequence"]["best"]
    probe["gate"] = {**probe["gate"], "mode": "probe", "detection": {"auroc_text": 1.0, "auroc_mcq": 0.9}}
    assert "| 0.05 / 0.90 | 1.00 / 0.90 | 0.95 / 0.80 |" in markdown_table(typed(results))  # the probe's detector
    results["featureforget"][8]["best_by_gate"]["none"]["best"]["gate"] = {"mode": "none"}
    assert "(+0.5%) | n/a / n/a | - | 0.95 / 0.80 |" in markdown_table(typed(results))  # static: no gate
    assert "| 8 | baseline SAE, static | no retain-safe setting | n/a |" in table
    assert "below" not in table
    results["baseline"][8]["best_by_gate"]["sequence"]["best"]["test"]["retain_mcq"]["after"] = 0.69
    # the dev half's bound, missed on test
    assert "| 0.70 -> 0.69 (below 0.99 of clean) |" in markdown_table(typed(results))
    v = verdict(typed(results))
    assert "layer 8, gated: FeatureForget (gated) beats the baseline SAE (gated)" in v
    assert "layer 8, static: FeatureForget (static) vs the baseline SAE (static): not comparable" in v
    results["baseline"][8] = _res((None,), (0.5, [0.2, 0.6], 0.8, 0.4, 0.7, 0.7))
    assert "within noise" in verdict(typed(results)) and "same test questions" not in verdict(typed(results))
    # with the test halves' per-question answers on the same questions: the paired difference too
    ff_test = results["featureforget"][8]["best_by_gate"]["sequence"]["best"]["test"]
    base_test = results["baseline"][8]["best_by_gate"]["sequence"]["best"]["test"]
    ff_test["forget_correct"] = {"before": "1" * 10, "after": "0" * 10}
    base_test["forget_correct"] = {"before": "1" * 10, "after": "1" * 5 + "0" * 5}
    assert ("test scores 0.600 vs 0.500; difference +0.500 [+0.20, +0.80] on the same test questions "
            "(paired bootstrap; above zero)." in verdict(typed(results)))
    base_test["forget_correct"] = {"before": "1" * 9 + "0", "after": "0" * 10}  # other questions (or clean answers)
    assert "same test questions" not in verdict(typed(results))


def test_limits_table_splits_the_forget_questions_by_the_gate():
    from pipelines.report import limits_table

    results = {"featureforget": {8: _res((0.2, [0.1, 0.3], 0.8, 0.64, 0.7, 0.7),
                                         (0.6, [0.5, 0.7], 0.8, 0.32, 0.7, 0.7))}}
    assert limits_table(typed(results)) == ""  # results without the split: no table
    gated = results["featureforget"][8]["best_by_gate"]["sequence"]["best"]
    gated["gate"]["forget_split"] = {"opened": {"questions": 30, "before": 0.8, "after": 0.2},
                                     "shut": {"questions": 10, "before": 0.8, "after": 0.8}, "ceiling": 0.5}
    want = "| 8 | FeatureForget, gated | 30/40 | 0.80 -> 0.20 | 0.80 -> 0.80 | 0.500 | 0.600 |"
    assert want in limits_table(typed(results))


def test_held_back_table_lists_higher_dev_scores_that_break_a_retain_bound():
    from pipelines.report import held_back_table

    results = {"featureforget": {8: _res((None,), (0.3, [0.2, 0.4], 0.8, 0.56, 0.7, 0.7))}}
    assert held_back_table(typed(results)) == ""  # no sweep: no table

    def entry(label, gate, dev, retain_after, ce_after=None, n=20):
        half = {"unlearning_score": dev, "retain_mcq": {"before": 0.7, "after": retain_after}}
        return {"label": label, "setting": {"gate": gate}, "n_features": n, "dev": half,
                "retain_loss": {"before": 2.0, "after": ce_after}}

    results["featureforget"][8]["sweep"] = [
        entry("strong", "sequence", 0.5, 0.69),                 # above the chosen 0.3, loses a question
        entry("hot", "sequence", 0.4, 0.7, ce_after=2.1),       # above, retain CE +5%
        entry("chosen", "sequence", 0.3, 0.7, ce_after=2.0),    # the chosen one: not listed
        entry("weak", "sequence", 0.2, 0.6),                    # below the chosen one: not listed
        entry("none", "sequence", 0.9, 0.1, n=0),               # edits nothing: not listed
        entry("static", "none", 0.1, 0.2),                      # static: none qualified, so listed
    ]
    results["featureforget"][8]["config"] = {"retain_ratio": 0.99, "max_retain_ce_rise": 0.01}
    table = held_back_table(typed(results))
    assert "| 8 | FeatureForget, gated | strong | 0.500 | 0.300 | retain MCQ 0.700 -> 0.690 (< 0.99 x clean) |" in table
    assert "| 8 | FeatureForget, gated | hot | 0.400 | 0.300 | retain CE +5.0% (> 1%) |" in table
    sweep = results["featureforget"][8]["sweep"]  # with the entries' diagnostics: what broke the bound
    sweep[0]["retain_lost"] = {"count": 2, "items": [
        {"half": "dev", "item": "a small | rounded lump", "gate_margin": 0.07},
        {"half": "test", "item": "never shown: test half", "gate_margin": 3.0}]}
    sweep[1]["retain_text_opened"] = [{"row": 4, "item": "mouth or throat", "gate_margin": 4.12}]
    table = held_back_table(typed(results))
    assert '| strong | 0.500 | 0.300 | retain MCQ 0.700 -> 0.690 (< 0.99 x clean); lost: "a small / rounded lump" ' \
           "(gate margin +0.07) |" in table
    assert '| hot | 0.400 | 0.300 | retain CE +5.0% (> 1%); opened on: "mouth or throat" (gate margin +4.12) |' in table
    assert "never shown" not in table
    assert table.index("| strong |") < table.index("| hot |")  # best first
    assert "| 8 | FeatureForget, static | static | 0.100 | none qualified |" in table
    assert all(f"| {name} |" not in table for name in ("chosen", "weak", "none"))
    from cli import format_eval  # ff eval's summary names the same settings under the gate's line

    res = {**results["featureforget"][8], "method": "featureforget", "layer": 8,
           "sae": {"fvu": 0.4, "l0": 25.0, "loss_recovered": None},
           "best_ood_reason": "no out-of-distribution sets configured"}
    text = format_eval(EvalResult.from_dict(res))
    assert "  held back: strong (dev 0.500): retain MCQ 0.700 -> 0.690 (< 0.99 x clean)" in text
    assert text.index("best, gate sequence") < text.index("held back: strong") < text.index("held back: hot")


def test_seeds_table_mean_and_spread():
    from pipelines.report import seeds_table

    runs = [_res((0.1, [0.0, 0.2], 0.8, 0.7, 0.7, 0.7), (0.3, [0.2, 0.4], 0.8, 0.6, 0.7, 0.7)),
            _res((None,), (0.5, [0.4, 0.6], 0.8, 0.4, 0.7, 0.7))]
    table = seeds_table(typed_seeds({"featureforget": {4: runs}}))
    assert "| 4 | featureforget | sequence | 2 (2 retain-safe) | 0.400 | 0.300 - 0.500 |" in table
    assert "| 4 | featureforget | none | 2 (1 retain-safe) | 0.100 | 0.100 - 0.100 |" in table
    assert "out of distribution" not in table  # no seed has an OOD choice
    runs[0]["best_ood"] = {"ood": {"test": {"unlearning_score": 0.5}}}
    runs[1]["best_ood"] = {"ood": {"test": {"unlearning_score": 0.3}}}
    table = seeds_table(typed_seeds({"featureforget": {4: runs}}))
    assert ("| 4 | featureforget | out of distribution (chosen on its dev half) | 2 (2 general-safe) | 0.400 "
            "| 0.300 - 0.500 |") in table


def test_seeds_verdict_per_seed_and_paired_mean():
    from pipelines.report import seeds_verdict

    def run(score, after):
        r = _res((None,), (score, [score - 0.1, score + 0.1], 0.8, 0.4, 0.7, 0.7))
        r["best_by_gate"]["sequence"]["best"]["test"] = {
            **r["best_by_gate"]["sequence"]["best"]["test"], "forget_correct": {"before": "1" * 8, "after": after}}
        return r

    seeds = {"featureforget": {4: [run(0.75, "11000000"), run(0.5, "11110000")]},
             "baseline": {4: [run(0.25, "11111100"), run(0.5, "11110000")]}}
    text = seeds_verdict(typed_seeds(seeds))
    assert "- seed 0: layer 4, gated: FeatureForget (gated) beats the baseline SAE (gated)" in text
    assert "- seed 1: layer 4, gated: FeatureForget (gated) vs the baseline SAE (gated): within noise" in text
    # mean over the seeds: FeatureForget keeps (2 + 4) / 2 = 3 of 8, the baseline (6 + 4) / 2 = 5: +0.25
    assert "- layer 4, gated, mean over 2 seeds: FeatureForget minus the baseline SAE +0.250 [" in text
    assert text.count("mean over") == 1  # the static gate had no retain-safe setting: no average for it
    seeds["baseline"][4][1]["best_by_gate"]["sequence"]["best"]["test"]["forget_correct"]["before"] = "1" * 7 + "0"
    assert "mean over" not in seeds_verdict(typed_seeds(seeds))  # other questions in one seed: no paired average
    one = {"featureforget": {4: seeds["featureforget"][4][:1]}, "baseline": {4: seeds["baseline"][4][:1]}}
    assert seeds_verdict(typed_seeds(one)).count("mean over") == 0  # one seed: its verdict only


def test_seeds_verdict_averages_each_prompt_format_in_and_out_of_distribution():
    """The mean over seeds per format: kshot2 (in distribution) and the OOD side's plain and kshot2
    halves, each paired over its own test questions; a format one method lacks gets no line."""
    import copy

    from pipelines.report import seeds_verdict

    def half(after, before="1" * 4):
        return {"unlearning_score": 0.0, "forget_mcq": {"before": 1.0, "after": 0.5},
                "retain_mcq": {"before": 0.7, "after": 0.7}, "forget_correct": {"before": before, "after": after}}

    def run(plain, kshot2, ood_plain, ood_kshot2):
        r = _res((None,), (0.5, [0.4, 0.6], 0.8, 0.4, 0.7, 0.7))
        best = r["best_by_gate"]["sequence"]["best"]
        best["test"] = {**best["test"], "forget_correct": {"before": "1" * 4, "after": plain}}
        best["formats"] = {"kshot2": {"dev": half("1111"), "test": half(kshot2)}}
        best["ood"] = {"forget_mcq": {"before": 0.8, "after": 0.5}, "retain_mcq": {"before": 0.7, "after": 0.7},
                       "test": half(ood_plain), "formats": {"kshot2": {"dev": half("1111"), "test": half(ood_kshot2)}}}
        return r

    # kshot2: FeatureForget keeps (0 + 2) / 2 = 1 of 4 answers, the baseline all 4: (1 - 1/4) - (1 - 4/4) = +0.75
    seeds = {"featureforget": {4: [run("1100", "0000", "1110", "1000"), run("1100", "1100", "1110", "1000")]},
             "baseline": {4: [run("1100", "1111", "1111", "1111"), run("1100", "1111", "1111", "1111")]}}
    lines = [x for x in seeds_verdict(typed_seeds(seeds)).splitlines() if "mean over" in x]
    assert [x.split(":")[0] for x in lines] == [
        "- layer 4, gated, mean over 2 seeds", "- layer 4, gated, format kshot2, mean over 2 seeds",
        "- layer 4, gated, out of distribution, mean over 2 seeds",
        "- layer 4, gated, out of distribution, format kshot2, mean over 2 seeds"]
    assert "SAE +0.000 [" in lines[0] and "SAE +0.750 [" in lines[1]
    assert "SAE +0.250 [" in lines[2] and "SAE +0.750 [" in lines[3]
    lacking = copy.deepcopy(seeds)
    del lacking["baseline"][4][1]["best_by_gate"]["sequence"]["best"]["formats"]
    got = seeds_verdict(typed_seeds(lacking))
    assert "gated, format kshot2, mean" not in got and "out of distribution, format kshot2, mean" in got


def test_ood_verdict_compares_both_choices_on_the_same_questions():
    from pipelines.report import ood_verdict

    def ood(score, ci, after):
        return {"test": {"unlearning_score": score, "ci95": ci,
                         "forget_correct": {"before": "1" * 10, "after": after}}}

    ff = _res((None,), (0.3, [0.2, 0.4], 0.8, 0.56, 0.7, 0.7))
    base = _res((None,), (0.3, [0.2, 0.4], 0.8, 0.56, 0.7, 0.7))
    assert ood_verdict(typed({"featureforget": {4: ff}, "baseline": {4: base}})) == ""  # no OOD sets evaluated
    ff["best_ood"] = {"ood": ood(0.9, [0.7, 1.0], "1" + "0" * 9)}
    base["best_ood"] = {"ood": ood(0.3, [0.1, 0.5], "1" * 7 + "0" * 3)}
    ff["best"] = {"ood": ood(0.5, [0.2, 0.8], "1" * 5 + "0" * 5)}
    base["best"] = {"ood": {"test": {"unlearning_score": 0.4, "ci95": [0.1, 0.7],
                                     "forget_correct": {"before": "0" + "1" * 9, "after": "0" * 10}}}}
    text = ood_verdict(typed({"featureforget": {4: ff}, "baseline": {4: base}}))
    assert ("- layer 4, chosen on the OOD dev half: FeatureForget beats the baseline SAE (intervals do not overlap); "
            "OOD test scores 0.900 vs 0.300; difference +0.600 [" in text)
    # the in-distribution choices: other clean answers recorded, so the intervals only
    assert ("- layer 4, the in-distribution choices: FeatureForget vs the baseline SAE: within noise (intervals "
            "overlap); OOD test scores 0.500 vs 0.400.") in text
