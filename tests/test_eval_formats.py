"""The prompt-format suite and the fluency bound inside `ff eval` (tiny model, offline)."""
from __future__ import annotations

import pytest
import torch
from test_pipelines_evaluate import write_mcq
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from pipelines.config import EvalConfig, SweepGrid
from pipelines.evalsets import eval_data
from pipelines.evaluate import evaluate_run
from pipelines.formats import build_prompt
from pipelines.result import Entry, EvalResult
from pipelines.scoring import min_score, pick_best, unlearning_score, why_unsafe

LAYER = 1


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, device="cpu")


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_corpora):
    d = tmp_path_factory.mktemp("mcq")
    retain, unlearn = tiny_corpora
    return EvalConfig(forget_mcq=write_mcq(d / "f.jsonl", 16, 1), retain_mcq=write_mcq(d / "r.jsonl", 12, 2),
                      forget_text=unlearn, retain_text=retain, max_text_tokens=300, ctx_len=32,
                      max_batch_tokens=400, text_batch_contexts=4, ood_forget_mcq=None, ood_retain_mcq=None,
                      ood_forget_text=None, ood_retain_text=None, bootstrap=100, fluency_prompts=4,
                      formats=("plain", "kshot2", "after_bio"), format_questions=8,
                      grid=SweepGrid(multipliers=(5.0,), ablate=True, top_n=(10,), selections=("saebench",),
                                     gates=("none",)))


def _part(forget, retain):
    return {"forget_mcq": {"before": forget[0], "after": forget[1]},
            "retain_mcq": {"before": retain[0], "after": retain[1]},
            "unlearning_score": unlearning_score(*forget)}


def _entry(label, forget, retain, formats=None, fluency=None):
    e = {"label": label, "n_features": 10, "dev": _part(forget, retain), "test": _part(forget, retain)}
    if formats:
        e["formats"] = {f: {"dev": _part(*v), "test": _part(*v)} for f, v in formats.items()}
    if fluency:
        e["fluency"] = {"forget": {"nll": fluency[0], "nll_clean": fluency[1]}}
    return Entry.from_dict(e)


def _best(sweep, *args, **kw):
    i, reason = pick_best(sweep, *args, **kw)
    return (None if i is None else sweep[i].label), reason


def test_a_setting_unsafe_in_one_format_is_never_chosen_and_scores_are_minima():
    a = _entry("a", (0.8, 0.2), (0.7, 0.7), {"kshot2": ((0.8, 0.2), (0.7, 0.6))})  # loses retain in kshot2
    b = _entry("b", (0.8, 0.4), (0.7, 0.7), {"kshot2": ((0.8, 0.6), (0.7, 0.7))})  # plain 0.5, kshot2 0.25
    c = _entry("c", (0.8, 0.5), (0.7, 0.7), {"kshot2": ((0.8, 0.5), (0.7, 0.7))})  # 0.375 in both
    assert "in format kshot2" in why_unsafe(a, 0.99, 0.01)
    assert min_score(b) == pytest.approx(0.25) and min_score(c) == pytest.approx(0.375)
    best, reason = _best([a, b, c], 0.99, 0.01)
    assert reason is None and best == "c"  # the highest minimum, not the highest plain score
    best, reason = _best([a], 0.99, 0.01)
    assert best is None and "no retain-safe setting" in reason


def test_the_fluency_bound_holds_back_a_setting_that_garbles():
    garbles = _entry("garbles", (0.8, 0.2), (0.7, 0.7), fluency=(4.7, 0.9))
    fluent = _entry("fluent", (0.8, 0.4), (0.7, 0.7), fluency=(1.5, 0.9))
    assert "not fluent" in why_unsafe(garbles, 0.99, 0.01, max_nll=1.0)
    assert _best([garbles, fluent], 0.99, 0.01, max_nll=1.0)[0] == "fluent"
    assert _best([garbles, fluent], 0.99, 0.01, max_nll=None)[0] == "garbles"
    assert _best([garbles, fluent], 0.99, 0.01, max_nll=0.5)[0] is None


def test_each_format_set_holds_the_documented_prompts(lm, cfg):
    data = eval_data(lm, cfg)
    assert data.formats == ("plain", "kshot2", "after_bio")
    plain = data.forget_mcq
    for fmt in ("kshot2", "after_bio"):
        es = getattr(data, f"forget_mcq@{fmt}")
        assert es.size == cfg.format_questions == len(es.test_Q)
        assert int(es.test_Q.sum()) == cfg.format_questions // 2  # half dev, half test
        # the subset keeps each question's half of the plain sample
        for q, t in zip(es.items, es.test_Q.tolist()):
            assert bool(plain.test_Q[plain.items.index(q)]) == t
        # the tokens of the first row's shared prompt are the format's prompt of its question
        b = es.batches[0]
        prompt_ids = b.input_ids_BT[0][(b.seg_BT[0] == 0)].tolist()
        text = lm.tokenizer.decode(prompt_ids, skip_special_tokens=True)
        qi = int(es.layout.question_N[(b.row_N == 0).nonzero()[0, 0]])
        want = lm.tokenizer.decode(lm.tokenizer(build_prompt(fmt, es.items[qi]))["input_ids"],
                                   skip_special_tokens=True)
        assert text == want
    assert set(data.fluency) == {"forget_text", "retain_text"}
    assert all(ids.shape == (cfg.fluency_prompts, 13) for ids in data.fluency.values())


def test_evaluate_run_reports_every_format_and_fluency(lm, cfg, tmp_path):
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    res = evaluate_run(run, lm, cfg.replace(retain_ratio=0.0, max_fluency_nll_rise=None), progress=False)
    best = res.best
    assert best is not None, res.best_reason
    assert set(best.formats) == {"kshot2", "after_bio"}
    for fmt, p in best.formats.items():
        assert p.test.questions == cfg.format_questions // 2 and p.test.has("ci95")
    scores = [best.test.unlearning_score] + [p.test.unlearning_score for p in best.formats.values()]
    assert best.formats_min.test == pytest.approx(min(s for s in scores if s is not None))
    assert set(best.fluency) == {"forget_text", "retain_text"}
    assert res.chosen("none").fluency == best.fluency
    f = best.fluency["forget_text"]
    assert 0 <= f.changed <= 1 and f.nll_clean > 0 and len(f.examples) == 3
    # every sweep entry carries its per-format halves; the clean accuracy is the same in each entry
    befores = {e.label: e.formats["kshot2"].dev.forget_mcq.before for e in res.sweep}
    assert len(set(befores.values())) == 1
    assert torch.isfinite(torch.tensor(list(befores.values()))).all()
    # the chosen entry's intervals are its own: no half of the sweep's entries carries one
    assert "ci95" not in str([e.to_dict() for e in res.sweep]) and best.formats["kshot2"].test.ci95 is not None


def test_the_demo_preset_scores_every_format_of_the_suite():
    from pipelines.config import DEMO_FORMATS
    from pipelines.formats import FORMATS

    demo = EvalConfig.preset("demo")
    assert DEMO_FORMATS == FORMATS and demo.formats == FORMATS and demo.grid.gate_window is not None
    assert EvalConfig.preset("full").formats == ("plain",)


def test_without_sweep_losses_the_chosen_setting_keeps_the_format_halves_the_sweep_measured(lm, cfg, tmp_path):
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    res = evaluate_run(run, lm, cfg.replace(retain_ratio=0.0, max_fluency_nll_rise=None, sweep_losses=False),
                       progress=False)
    best = res.best
    entry = next(e for e in res.sweep if e.label == best.label)
    for fmt in ("kshot2", "after_bio"):
        assert best.formats[fmt].dev == entry.formats[fmt].dev
        assert best.formats[fmt].test.unlearning_score == entry.formats[fmt].test.unlearning_score
        assert best.formats[fmt].test.has("ci95")
    assert best.retain_loss.after is not None  # the complete re-measurement ran


def test_the_in_distribution_choice_reports_its_out_of_distribution_formats_with_intervals(lm, cfg, tmp_path):
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    ood = cfg.replace(ood_forget_mcq=cfg.forget_mcq, ood_retain_mcq=cfg.retain_mcq, retain_ratio=0.0,
                      max_fluency_nll_rise=None, sweep_losses=False, fluency_prompts=0)
    part = evaluate_run(run, lm, ood, progress=False).best.ood
    assert set(part.formats) == {"kshot2", "after_bio"}
    assert all(p.test.has("ci95") for p in part.formats.values())
    assert part.formats_min.test == min_score(part, "test")


def test_the_report_gives_a_paired_verdict_in_each_format():
    from pipelines.report import verdict
    from pipelines.scoring import half

    before = torch.tensor([True] * 10 + [False] * 2)
    test = torch.ones(12, dtype=torch.bool)
    keep = (torch.ones(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool))

    def chosen(after_plain, after_fmt):
        def part(after):
            return half((before, after), keep, test, torch.ones(4, dtype=torch.bool), bootstrap=200)
        return {"label": "x", "test": part(after_plain).to_dict(),
                "formats": {"kshot2": {"test": part(after_fmt).to_dict()}}}

    def result(best):
        return EvalResult.from_dict({"best_by_gate": {"probe": {"best": best, "reason": None}}})

    forgot, kept = torch.zeros(12, dtype=torch.bool), before.clone()
    res = {"featureforget": {4: result(chosen(forgot, kept))}, "baseline": {4: result(chosen(kept, kept))}}
    lines = verdict(res).splitlines()
    plain = next(x for x in lines if "format" not in x)
    fmt = next(x for x in lines if "format kshot2" in x)
    assert "FeatureForget (probe-gated) beats" in plain and "+1.000" in plain
    assert "within noise" in fmt and "+0.000" in fmt  # the same answers in kshot2: no difference


def test_batched_fluency_equals_each_set_measured_alone(lm, cfg, tmp_path):
    """EvalData.fluency_of decodes every prose set in one batch, scores only the continuations
    the edit changed and reuses what it measured before: the same numbers and examples as
    pipelines.fluency.measure_fluency on each set alone."""
    from pipelines.config import Setting
    from pipelines.evalsets import FLUENCY_NEW_TOKENS
    from pipelines.fluency import measure_fluency
    from pipelines.intervene import Intervention, load_run

    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash))
    data = eval_data(lm, cfg)
    for setting in (Setting(gate="none", mode="clamp", multiplier=50.0), Setting(gate="none", mode="ablate", top_n=2)):
        iv = Intervention(run, setting)
        done = {}
        got = data.fluency_of(lm.model, lm.tokenizer, iv, examples=2, done=done)
        assert set(got) == set(done) == {"forget_text", "retain_text"}
        for name, ids in data.fluency.items():
            want = measure_fluency(lm.model, lm.tokenizer, ids, lambda: iv.hooked(lm.model),
                                   n_new=FLUENCY_NEW_TOKENS, examples=2).to_dict()
            assert got[name].to_dict()["examples"] == want["examples"]
            for k in ("nll", "nll_clean", "distinct", "distinct_clean", "changed", "n_prompts"):
                assert getattr(got[name], k) == pytest.approx(want[k], rel=1e-5), (name, k)
        assert data.fluency_of(lm.model, lm.tokenizer, iv, examples=2, done=done) == got  # from `done`
    assert 0 < got["forget_text"].changed < 1 or got["retain_text"].changed < 1


def _numbers(x):
    """A result's JSON without what differs by design between the two paths: timings, rows rerun,
    the config (it names the path)."""
    if isinstance(x, dict):
        return {k: _numbers(v) for k, v in x.items() if k not in ("seconds", "cpu_seconds", "rows_rerun", "config")}
    if isinstance(x, list):
        return [_numbers(v) for v in x]
    return x


def _first_difference(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(dict.fromkeys([*a, *b])):
            d = _first_difference(a.get(k), b.get(k), f"{path}.{k}")
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _first_difference(x, y, f"{path}[{i}]"))), None)
    same = a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # nan == nan
    return None if same else f"{path}: {a!r} != {b!r}"


def test_the_evaluation_without_reuse_gives_the_same_result(lm, cfg, tmp_path):
    """EvalConfig.reuse=False (every setting through the whole model over every row, the chosen
    settings measured again, every fluency continuation scored): the reference the reuse is
    measured against gives the same result, every format, half, CE and fluency number."""
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    c = cfg.replace(retain_ratio=0.0, max_fluency_nll_rise=None, sweep_losses=False)
    fast, slow = (evaluate_run(run, lm, c.replace(reuse=r), progress=False) for r in (True, False))
    assert eval_data(lm, c.replace(reuse=False)) is not eval_data(lm, c)  # each path has its own clean pass
    assert fast.best is not None and fast.best.formats and fast.best.fluency
    a, b = _numbers(fast.to_dict()), _numbers(slow.to_dict())
    assert _first_difference(a, b) is None
    rows = {e.label: e.rows_rerun for e in fast.sweep}
    assert all(e.rows_rerun >= rows[e.label] for e in slow.sweep)


def test_fluency_of_several_settings_decodes_only_the_prompts_their_edits_reach(lm, cfg, tmp_path, monkeypatch):
    """EvalData.fluency_many: settings decoded together, each on its own rows, and the prompts a
    gated edit never reaches (on the prompt or the clean continuation) left to the clean
    continuation without decoding: the same numbers and examples as each setting measured alone
    by pipelines.fluency.measure_fluency."""
    import pipelines.fluency as fluency
    from pipelines.config import Setting
    from pipelines.evalsets import FLUENCY_NEW_TOKENS, edit_reaches
    from pipelines.fluency import measure_fluency
    from pipelines.intervene import Intervention, load_run

    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, probe_layer=LAYER - 1))
    data = eval_data(lm, cfg)
    data.fluency_of(lm.model, lm.tokenizer, None)  # the clean continuations
    ids = torch.cat(list(data.fluency.values()))
    clean = torch.cat([data.fluency_ref[n].cont_PN for n in data.fluency])
    probe = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0))
    gated = None
    for thr in torch.linspace(-3, 3, 61).tolist():  # a threshold at which the gate opens on some prompts only
        iv = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20,
                                       gate_threshold=thr + float(probe.gating.threshold)))
        if 0 < int(edit_reaches(lm.model, iv, ids, clean).sum()) < len(ids):
            gated = iv
            break
    assert gated is not None, "no threshold opens the probe gate on some prompts only"
    ivs = [gated, Intervention(run, Setting(gate="none", mode="clamp", multiplier=50.0)), None]
    decoded = []
    real = fluency.greedy

    def counting(model, ids_PT, n_new, **kw):
        decoded.append(len(ids_PT))
        return real(model, ids_PT, n_new, **kw)
    monkeypatch.setattr(fluency, "greedy", counting)
    got = data.fluency_many(lm.model, lm.tokenizer, ivs, examples=2)
    reach = int(edit_reaches(lm.model, gated, ids, clean).sum())
    assert decoded == [reach + len(ids)], "one batch: the gated setting's reached prompts and every static one"
    monkeypatch.setattr(fluency, "greedy", real)
    for iv, fl in zip(ivs, got):
        edit = None if iv is None else (lambda iv=iv: iv.hooked(lm.model))
        for name, p_ids in data.fluency.items():
            want = measure_fluency(lm.model, lm.tokenizer, p_ids, edit, n_new=FLUENCY_NEW_TOKENS, examples=2).to_dict()
            assert fl[name].to_dict()["examples"] == want["examples"]
            for k in ("nll", "nll_clean", "distinct", "distinct_clean", "changed", "n_prompts"):
                assert getattr(fl[name], k) == pytest.approx(want[k], rel=1e-5), (name, k)
