"""`ff run` end to end on the tiny model: cache, train both methods, evaluate, report; rerun reuses."""
from __future__ import annotations

import json

from click.testing import CliRunner

from cli import main
from pipelines.report import markdown_table, verdict


def test_ff_run_end_to_end_and_resume(tmp_path, tiny_model, tiny_corpora, monkeypatch):
    from trainer import config

    monkeypatch.setitem(config.PRESETS, "demo", {**config.PRESETS["demo"], "steps": 60, "warmup": 5,
                                                  "recluster_every": 10, "checkpoint_every": 20})
    out = tmp_path / "demo"
    args = ["run", "--preset", "demo", "--out", str(out), "--model", tiny_model, "--layers", "1",
            "--contexts", "48", "--quiet"]
    from pipelines import workflow

    # the tiny corpora instead of the bundled ones (the tiny tokenizer knows only their words)
    orig = workflow.PRESETS["demo"]
    from dataclasses import replace

    workflow.PRESETS["demo"] = replace(orig, cache=replace(orig.cache, retain=tiny_corpora[0], unlearn=tiny_corpora[1]),
                                       eval={"max_questions": 8, "max_text_tokens": 256})
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
        assert "| 1 | featureforget |" in md and "| 1 | baseline |" in md and "## Verdict" in md

        stamps = {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
        r = CliRunner().invoke(main, args)  # everything is reused
        assert r.exit_code == 0, r.output
        assert stamps == {p: p.stat().st_mtime_ns for p in (out / "runs").rglob("*") if p.is_file()}
    finally:
        workflow.PRESETS["demo"] = orig


def _res(score, fb, fa, rb, ra):
    best = None if score is None else {
        "setting": {"mode": "clamp", "multiplier": 50.0}, "unlearning_score": score,
        "forget_mcq": {"before": fb, "after": fa}, "retain_mcq": {"before": rb, "after": ra},
        "forget_loss": {"before": 2.0, "after": 2.5}, "retain_loss": {"before": 2.0, "after": 2.01}}
    return {"best": best, "sweep": [], "sae": {"fvu": 0.4, "l0": 25.0, "dead_fraction": 0.1, "loss_recovered": None}}


def test_report_table_and_verdict():
    results = {"featureforget": {8: _res(0.25, 0.8, 0.6, 0.7, 0.7)}, "baseline": {8: _res(None, 0, 0, 0, 0)}}
    table = markdown_table(results)
    assert "| 8 | featureforget | mode=clamp, multiplier=50.0 | 0.250 | 0.800 -> 0.600 | 0.700 -> 0.700 |" in table
    assert "| 8 | baseline | none kept retain | 0.000 |" in table
    assert "n/a" in table  # loss recovered None
    assert verdict(results) == "- layer 8: FeatureForget 0.250 beats the baseline SAE 0.000."
    results["baseline"][8] = _res(0.3, 0.8, 0.56, 0.7, 0.7)
    assert "does NOT beat" in verdict(results)
