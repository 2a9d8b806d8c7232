"""The evaluation result's typed form (pipelines/result.py): the same JSON back, absent keys kept
absent, versions, one-line errors, and no reader outside its owners indexing it by string keys."""
import json
import re
from pathlib import Path

import pytest

from pipelines.errors import EvalError
from pipelines.result import RESULT_FORMAT, EvalResult, ModelEvalResult

ROOT = Path(__file__).resolve().parent.parent


def _half(score, bootstrap=False):
    h = {"questions": 10, "forget_mcq": {"before": 0.8, "after": 0.8 * (1 - score)},
         "retain_mcq": {"before": 0.7, "after": 0.7}, "unlearning_score": score, "correct_subset_score": score}
    if bootstrap:
        h.update(ci95=None, forget_correct={"before": "1" * 8 + "00", "after": "0" * 10})
    return h


def _result():
    sweep = {"setting": {"mode": "clamp", "gate": "probe"}, "label": "clamp m=10", "n_features": 20,
             "forget_mcq": {"before": 0.8, "after": 0.4}, "retain_mcq": {"before": 0.7, "after": 0.7},
             "forget_loss": {"before": 3.0, "after": None}, "retain_loss": {"before": 3.0, "after": 3.01},
             "dev": _half(0.5), "retain_lost": {"count": 0, "items": []}, "retain_text_opened": [],
             "unlearning_score": 0.5, "rows_rerun": 12, "seconds": 1.5,
             "formats": {"kshot2": {"dev": _half(0.25), "test": _half(0.3)}},
             "fluency": {"forget": {"nll": 1.3, "nll_clean": 1.1, "distinct": 0.7, "distinct_clean": 0.75,
                                    "changed": 0.5}}}
    best = {**sweep, "test": _half(0.4, bootstrap=True), "formats_min": {"dev": 0.25, "test": 0.3},
            "gate": {"mode": "probe", "percentile": 99.0, "threshold": 2.3, "open_rate_retain": 0.01,
                     "open_rate_questions": {"forget": 0.9},
                     "forget_split": {"opened": {"questions": 9, "before": 0.8, "after": 0.4},
                                      "shut": {"questions": 1, "before": 1.0, "after": 1.0}, "ceiling": 0.6},
                     "detection": {"auroc_text": 0.99, "auroc_mcq": 0.97, "auroc_text_ood": None}}}
    return {"format": 1, "run": "runs/x", "layer": 4, "method": "featureforget", "model": "m",
            "best": best, "best_reason": None, "best_ood": None, "best_ood_reason": "no out-of-distribution sets",
            "best_by_gate": {"probe": {"best": best, "reason": None}}, "clean": {"forget_mcq": 0.8},
            "sweep": [sweep], "selection": {"candidates_top20": {"n_features": 20, "auroc_text": 0.9}},
            "sae": {"fvu": 0.4, "mse": 1.0, "l0": 50.0, "tokens": 100, "dead_fraction": 0.0, "ce_clean": 3.0,
                    "ce_sae": 4.0, "ce_zero": 9.0, "loss_recovered": 0.8},
            "data": {"forget_mcq": 20}, "config": {"retain_ratio": 0.99, "formats": ["plain", "kshot2"]},
            "seconds": 10.0, "cpu_seconds": 19.0}


def test_the_same_json_back_with_absent_keys_kept_absent():
    d = _result()
    res = EvalResult.from_dict(json.loads(json.dumps(d)))
    assert json.dumps(res.to_dict()) == json.dumps(d)  # the same keys in the same order, the same values
    entry = res.sweep[0]
    assert entry.test is None and not entry.has("test") and "test" not in entry.to_dict()  # no test half
    assert res.best.test.ci95 is None and res.best.test.has("ci95")  # present, and null
    assert res.best.gate.forget_split.opened.questions == 9 and res.best.gate.detection.pair() == (0.99, 0.97)
    assert [name for name, _ in res.best.by_format()] == ["plain", "kshot2"]
    assert res.chosen("probe") == res.best and res.chosen("none") is None
    assert res.retain_bounds() == (0.99, 0.01) and entry.gate_mode == "probe"
    assert entry.fluency["forget"].examples is None


def test_versions_a_file_without_format_reads_and_a_newer_one_is_refused(tmp_path):
    d = _result()
    del d["format"]
    assert EvalResult.from_dict(d).to_dict() == d  # written before the field existed: same layout
    f = tmp_path / "unlearning.json"
    f.write_text(json.dumps({**d, "format": RESULT_FORMAT + 1}))
    with pytest.raises(EvalError, match=rf"^the evaluation result has format {RESULT_FORMAT + 1}, newer [^\n]*$"):
        EvalResult.load(f)
    f.write_text(json.dumps({**d, "best": ["not", "an", "entry"]}))
    with pytest.raises(EvalError, match=r"unlearning.json is not an ff eval result \(TypeError: [^\n]*$"):
        EvalResult.load(f)
    f.write_text("{")
    with pytest.raises(EvalError, match=r"is not an ff eval result \(JSONDecodeError"):
        EvalResult.load(f)


def test_the_run_setting_reads_through_the_result(tmp_path):
    from pipelines.intervene import chosen_setting, run_setting

    run = tmp_path / "run"
    run.mkdir()
    (run / "unlearning.json").write_text(json.dumps({**_result(), "format": RESULT_FORMAT + 1}))
    with pytest.raises(EvalError, match="newer than this ff reads"):
        run_setting(run)
    with pytest.raises(EvalError, match="newer than this ff reads"):
        chosen_setting(run)
    (run / "unlearning.json").write_text(json.dumps(_result()))
    assert chosen_setting(run).gate == "probe" and run_setting(run).multiplier == chosen_setting(run).multiplier


def test_the_model_evaluation_reads_its_entry_without_a_setting():
    d = {"model": "baked", "base": "m", "best": {k: v for k, v in _result()["best"].items() if k != "setting"},
         "config": {}, "seconds": 3.0}
    res = ModelEvalResult.from_dict(d)
    assert res.best.setting is None and res.best.test.unlearning_score == pytest.approx(0.4)
    assert res.to_dict() == d
    built = ModelEvalResult(model="x", base="m", best=res.best, config={}, seconds=1.0)  # not read from JSON
    assert list(built.to_dict()) == ["model", "base", "best", "config", "seconds"]
    assert EvalResult.from_dict({**_result(), "new_field": [1]}).to_dict()["new_field"] == [1]  # kept


def test_built_records_write_the_fields_given_in_order_and_updates_keep_their_place():
    from pipelines.result import Half, Pair

    h = Half.build(questions=4, forget_mcq=Pair.build(before=1.0, after=0.5), unlearning_score=0.5)
    assert list(h.to_dict()) == ["questions", "forget_mcq", "unlearning_score"] and not h.has("ci95")
    u = h.updated(ci95=[0.1, 0.9], questions=5)  # a new field comes last, a known one keeps its place
    assert list(u.to_dict()) == ["questions", "forget_mcq", "unlearning_score", "ci95"] and u.questions == 5
    assert h.questions == 4 and h.ci95 is None  # records are frozen: updated returns a copy
    assert Half.from_dict(json.loads(json.dumps(u.to_dict()))) == u  # read back: the same record
    assert u.updated(ci95=None).has("ci95") and u.updated(ci95=None).to_dict()["ci95"] is None  # an explicit null


READERS = ("cli.py", "pipelines/evaluate.py", "pipelines/report.py", "pipelines/export.py", "pipelines/intervene.py",
           "pipelines/workflow.py", "pipelines/generate.py", "pipelines/artifact.py", "pipelines/scoring.py",
           "scripts/check_export.py", "benchmarks/bench_eval.py")
RESULT_KEYS = ("best", "best_ood", "best_by_gate", "best_reason", "best_ood_reason", "sweep", "dev", "test", "ood",
               "formats", "formats_min", "fluency", "unlearning_score", "forget_mcq", "retain_mcq", "ci95", "sae")


def test_no_reader_indexes_the_result_by_string_keys():
    """The readers, the rules that choose a setting (pipelines/scoring.py) and the two that build
    results (pipelines/evaluate.py, pipelines/artifact.py) use fields; only pipelines/result.py,
    the owner, reads and writes the JSON."""
    keys = "|".join(RESULT_KEYS)
    pattern = re.compile(rf"""\[["'](?:{keys})["']\]|\.get\(["'](?:{keys})["']""")
    hits = [f"{name}:{i}: {line.strip()}" for name in READERS
            for i, line in enumerate((ROOT / name).read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, "\n".join(hits)
