"""METHOD §8 evaluation on the tiny model: fast path == plain HF forward, MCQ scoring, best
setting under the retain constraint, user errors, and one end-to-end evaluate_run."""
from __future__ import annotations

import json
import random
from dataclasses import replace

import pytest
import torch
from conftest import WORDS
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from pipelines.config import EvalConfig, Setting, SweepGrid
from pipelines.data import McqLayout, load_mcq, mcq_accuracy, mcq_scores, sample_split
from pipelines.errors import EvalError
from pipelines.evalsets import eval_data
from pipelines.evaluate import evaluate_run
from pipelines.fastlm import verify_fast_path
from pipelines.intervene import Intervention, load_run
from pipelines.result import RESULT_FORMAT, Entry, EvalResult
from pipelines.scoring import pick_best, unlearning_score

LAYER = 1


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, device="cpu")


def write_mcq(path, n, seed, n_choices=4):
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9)))
            choices = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 3))) for _ in range(n_choices)]
            f.write(json.dumps({"question": q, "choices": choices, "answer": rng.randrange(n_choices)}) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def cfg(tmp_path_factory, tiny_corpora):
    d = tmp_path_factory.mktemp("mcq")
    retain, unlearn = tiny_corpora
    return EvalConfig(forget_mcq=write_mcq(d / "f.jsonl", 24, 1), retain_mcq=write_mcq(d / "r.jsonl", 12, 2),
                      forget_text=unlearn, retain_text=retain, max_text_tokens=300, ctx_len=32,
                      max_batch_tokens=200, text_batch_contexts=4,
                      ood_forget_mcq=None, ood_retain_mcq=None, ood_forget_text=None, ood_retain_text=None,
                      bootstrap=200,
                      grid=SweepGrid(multipliers=(5.0,), ablate=True, top_n=(10, None), freq_thresholds=(0.01,),
                                     selections=("candidates", "saebench"), gates=("none",)))


@torch.no_grad()
def _plain_choice_scores(lm, questions, template, iv=None):
    """Reference: one plain HF forward per (question, choice), hooks for the intervention."""
    def go():
        out = torch.full((len(questions), max(len(q.choices) for q in questions)), float("-inf"),
                         dtype=torch.float64)
        for qi, q in enumerate(questions):
            prompt = lm.tokenizer(template.format(question=q.question))["input_ids"]
            for ci, c in enumerate(q.choices):
                cont = lm.tokenizer(" " + c, add_special_tokens=False)["input_ids"]
                logp = lm.model(torch.tensor([prompt + cont])).logits[0].log_softmax(-1)
                out[qi, ci] = sum(float(logp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cont))
        return out
    if iv is None:
        return go()
    with iv.hooked(lm.model):
        return go()


def test_fast_path_matches_plain_forward_with_hooks(lm, cfg, tmp_path):
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash))
    verify_fast_path(lm.model, LAYER)
    data = eval_data(lm, cfg)
    data.prepare(lm.model, LAYER)
    qs = sample_split(load_mcq(cfg.forget_mcq, "forget"), cfg.max_questions, cfg.sample_seed)[0]
    ref = _plain_choice_scores(lm, qs, cfg.mcq_template)
    torch.testing.assert_close(mcq_scores(torch.cat(data.forget_mcq.clean), data.forget_mcq.layout), ref,
                               atol=1e-4, rtol=1e-5)
    for setting in (Setting(gate="none", mode="clamp", multiplier=5.0), Setting(gate="none", mode="ablate", top_n=3),
                    Setting(gate="none", mode="zero")):
        iv = Intervention(run, setting)
        lp, rerun = data.forget_mcq.logprobs(lm.model, iv)
        assert rerun > 0
        fast = mcq_scores(torch.cat(lp), data.forget_mcq.layout)
        torch.testing.assert_close(fast, _plain_choice_scores(lm, qs, cfg.mcq_template, iv), atol=1e-4, rtol=1e-5)
        assert not torch.allclose(fast, ref)
        # text: every next-token log-prob of the packed contexts, plain forward with hooks
        lp, _ = data.retain_text.logprobs(lm.model, iv)
        ids = torch.cat([b.input_ids_BT for b in data.retain_text.batches])
        with torch.no_grad(), iv.hooked(lm.model):
            logp = lm.model(ids).logits.log_softmax(-1)
        ref_text = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].flatten()
        torch.testing.assert_close(torch.cat(lp), ref_text, atol=1e-4, rtol=1e-5)


def test_fast_path_with_a_probe_on_an_earlier_layer_matches_plain_forward_with_hooks(lm, cfg, tmp_path):
    """A probe read at block LAYER - 1 gating the edit at LAYER: the evaluation's fast path (cached
    residuals of both layers) gives what the hooked model gives, questions and text."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, probe_layer=LAYER - 1))
    data = eval_data(lm, cfg)
    data.prepare(lm.model, [LAYER - 1, LAYER])
    probe = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0))
    peak_Q = data.forget_mcq.gate_peaks(probe)  # threshold at the median peak: the gate opens on some questions only
    thr = float(peak_Q.median()) + float(run.gate["probe/b"][0])
    iv = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=thr))
    opened = data.forget_mcq.gate_peaks(iv) > iv.threshold
    assert 0 < float(opened.float().mean()) < 1
    qs = sample_split(load_mcq(cfg.forget_mcq, "forget"), cfg.max_questions, cfg.sample_seed)[0]
    lp, rerun = data.forget_mcq.logprobs(lm.model, iv)
    assert rerun > 0
    torch.testing.assert_close(mcq_scores(torch.cat(lp), data.forget_mcq.layout),
                               _plain_choice_scores(lm, qs, cfg.mcq_template, iv), atol=1e-4, rtol=1e-5)
    lp, _ = data.retain_text.logprobs(lm.model, iv)
    ids = torch.cat([b.input_ids_BT for b in data.retain_text.batches])
    with torch.no_grad(), iv.hooked(lm.model):
        logp = lm.model(ids).logits.log_softmax(-1)
    torch.testing.assert_close(torch.cat(lp), logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0].flatten(),
                               atol=1e-4, rtol=1e-5)


def test_mcq_scoring_picks_the_max_likelihood_choice():
    # q0: choice 0 has two tokens (-1 + -1.5 = -2.5), choice 1 one token (-2.0) -> pick 1
    # q1: three choices only; choice 2 (-0.1) wins; the missing 4th choice is never picked
    layout = McqLayout(question_N=torch.tensor([0, 0, 0, 1, 1, 1]), choice_N=torch.tensor([0, 0, 1, 0, 1, 2]),
                       answer_Q=torch.tensor([1, 0]), n_choices_Q=torch.tensor([2, 3]))
    lp = torch.tensor([-1.0, -1.5, -2.0, -3.0, -0.5, -0.1])
    scores = mcq_scores(lp, layout)
    assert scores.argmax(1).tolist() == [1, 2]
    assert mcq_accuracy(lp, layout) == 0.5


def test_mcq_accuracy_end_to_end_follows_the_model(lm, tmp_path):
    qs = load_mcq(write_mcq(tmp_path / "q.jsonl", 8, 5), "forget")
    template = EvalConfig().mcq_template
    best = _plain_choice_scores(lm, qs, template).argmax(1).tolist()
    path = tmp_path / "right.jsonl"
    path.write_text("".join(json.dumps({"question": q.question, "choices": q.choices, "answer": a}) + "\n"
                            for q, a in zip(qs, best)))
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text("".join(json.dumps({"question": q.question, "choices": q.choices, "answer": (a + 1) % 4})
                             + "\n" for q, a in zip(qs, best)))
    for f, acc in ((path, 1.0), (wrong, 0.0)):
        data = eval_data(lm, EvalConfig(forget_mcq=str(f), retain_mcq=str(f), forget_text="demo", retain_text="demo",
                                        max_text_tokens=64, ctx_len=32, ood_forget_mcq=None, ood_retain_mcq=None,
                                        ood_forget_text=None, ood_retain_text=None))
        data.forget_mcq.prepare(lm.model, LAYER)
        assert data.forget_mcq.clean_value() == acc


def _entry(label, n, forget, retain, retain_loss=None):
    part = {"forget_mcq": {"before": forget[0], "after": forget[1]},
            "retain_mcq": {"before": retain[0], "after": retain[1]},
            "unlearning_score": unlearning_score(*forget)}
    return Entry.from_dict({"label": label, "n_features": n, "dev": part, "test": part,
                            "retain_loss": {"before": 2.0, "after": retain_loss}})


def _best(sweep, *args, **kw):
    """pick_best -> (the chosen entry or None, reason)."""
    i, reason = pick_best(sweep, *args, **kw)
    return (None if i is None else sweep[i]), reason


def test_best_setting_is_chosen_on_dev_and_respects_the_retain_constraints():
    sweep = [_entry("a", 10, (0.6, 0.2), (0.5, 0.49)),    # best score but retain 0.98 x clean
             _entry("b", 10, (0.6, 0.3), (0.5, 0.495)),   # exactly 0.99 x clean: qualifies
             _entry("c", 20, (0.6, 0.45), (0.5, 0.52)),
             _entry("d", 0, (0.6, 0.6), (0.5, 0.5)),      # no features: never "best"
             _entry("e", 10, (0.6, 0.0), (0.5, 0.5), retain_loss=2.03)]  # retain CE +1.5%: too much
    best, reason = _best(sweep, 0.99, 0.01)
    assert best.label == "b" and reason is None
    assert best.dev.unlearning_score == pytest.approx(0.5)
    assert _best(sweep, 0.99, 0.02)[0].label == "e"  # within a 2% CE bound it qualifies
    best, reason = _best(sweep[:1] + sweep[3:4], 0.99, 0.01)
    assert best is None and reason.startswith("no retain-safe setting") and "a" in reason
    assert _best(sweep[3:4], 0.99, 0.01)[0] is None
    assert unlearning_score(0.0, 0.0) is None
    # the dev half decides: a setting that is best on test but not on dev is not chosen
    x, y = _entry("x", 10, (0.6, 0.3), (0.5, 0.5)), _entry("y", 10, (0.6, 0.4), (0.5, 0.5)).to_dict()
    y = Entry.from_dict({**y, "test": {**y["test"], "unlearning_score": 0.9}})
    assert _best([x, y], 0.99, 0.01)[0].label == "x"


def test_why_unsafe_names_the_bound_a_setting_breaks():
    from pipelines.scoring import why_unsafe

    assert why_unsafe(_entry("a", 10, (0.6, 0.2), (0.5, 0.49)), 0.99, 0.01) == \
        "retain MCQ 0.500 -> 0.490 (< 0.99 x clean)"
    assert why_unsafe(_entry("e", 10, (0.6, 0.0), (0.5, 0.5), retain_loss=2.03), 0.99, 0.01) == "retain CE +1.5% (> 1%)"
    assert why_unsafe(_entry("e", 10, (0.6, 0.0), (0.5, 0.5), retain_loss=2.03), 0.99, 0.02) is None
    assert why_unsafe(_entry("b", 10, (0.6, 0.3), (0.5, 0.495)), 0.99, 0.01) is None  # exactly 0.99 x clean
    # the questions fail first: the CE is not the reason then, however high
    assert why_unsafe(_entry("f", 10, (0.6, 0.0), (0.5, 0.4), retain_loss=9.0), 0.99, 0.01).startswith("retain MCQ")


@pytest.mark.parametrize("line, message", [
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer' must be an integer index"),
    ('{"question": "q", "choices": ["a"], "answer": 0}', "at least 2"),
    ('{"question": "q", "choices": ["a", "b"]}', "expected an object with"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 0', "not valid JSON"),
])
def test_malformed_mcq_line_names_file_and_line(tmp_path, line, message):
    good = json.dumps({"question": "q", "choices": ["a", "b"], "answer": 1})
    f = tmp_path / "bad.jsonl"
    f.write_text(f"{good}\n\n{line}\n{good}\n")
    with pytest.raises(EvalError, match=rf"bad\.jsonl:3: .*{message}"):
        load_mcq(str(f), "forget")
    assert len(load_mcq(str(f), "forget", limit=1)) == 1  # a limit stops before the bad line
    with pytest.raises(EvalError, match="does not exist"):
        load_mcq(str(tmp_path / "missing.jsonl"), "forget")


def test_model_mismatch_names_both_models(lm, tmp_path, cfg):
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, "sha256:0123other", model="google/gemma-2-2b")
    with pytest.raises(EvalError, match=r"gemma-2-2b.*sha256:0123other.*" + lm.info.weights_hash[:12]):
        evaluate_run(run, lm, cfg, progress=False)
    run = make_run(tmp_path / "deep", lm.info.d_model, 7, lm.info.weights_hash)
    with pytest.raises(EvalError, match="layer 7 .* 4 layers"):
        evaluate_run(run, lm, cfg, progress=False)


def test_evaluate_run_end_to_end(lm, cfg, tmp_path):
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    res = evaluate_run(run, lm, cfg, progress=False)
    text = json.dumps(res.to_dict())  # JSON-able, and read back to the same JSON
    assert json.dumps(EvalResult.from_dict(json.loads(text)).to_dict()) == text and res.format == RESULT_FORMAT
    # built from typed records, field by field what reading the JSON gives (repr: nan equals nan there)
    back = EvalResult.from_dict(json.loads(text))
    assert repr(replace(back, config=None)) == repr(replace(res, config=None))
    assert res.layer == LAYER and res.method == "featureforget"
    assert len(res.sweep) == 6  # clamp m=5 and ablate: top 10 and all candidates, saebench top 10
    for e in res.sweep:
        for pair in (e.forget_mcq, e.retain_mcq, e.forget_loss, e.retain_loss):
            assert set(pair.to_dict()) == {"before", "after"} and pair.before is not None
    assert (res.best is None) == (res.best_reason is not None)
    sae = res.sae
    assert 0 <= sae.dead_fraction <= 1 and sae.l0 > 0 and sae.fvu > 0
    assert sae.ce_zero != sae.ce_clean
    base = make_run(tmp_path / "base", lm.info.d_model, 2, lm.info.weights_hash, method="baseline")
    res = evaluate_run(base, lm, cfg, progress=False)
    assert [e.setting["selection"] for e in res.sweep] == ["saebench"] * 2  # top 10, m=5 / ablate


def test_entries_name_the_retain_questions_they_lose_and_the_passages_their_gate_opens_on(lm, cfg, tmp_path):
    """`retain_lost` and `retain_text_opened` (the report's "held back by" details): a gated
    setting can only change a question on which its gate opened (margin > 0); the lists hold
    the questions themselves, dev half first."""
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    grid = SweepGrid(multipliers=(50.0,), top_n=(None,), selections=("candidates",),
                     gates=("none", "sequence", "probe"), gate_percentile=50.0, probe_percentiles=(50.0,))
    # the forget questions stand in as retain questions: the tiny model answers some of them
    res = evaluate_run(run, lm, cfg.replace(grid=grid, retain_ratio=0.0, retain_mcq=cfg.forget_mcq), progress=False)
    questions = {json.loads(line)["question"] for line in open(cfg.forget_mcq)}
    lost_behind_a_gate = 0
    for e in res.sweep:
        lost, gated = e.retain_lost, e.gate_mode != "none"
        assert len(lost.items) == min(lost.count, 8)
        halves = [i.half for i in lost.items]
        assert halves == sorted(halves)  # "dev" < "test"
        for i in lost.items:
            assert i.item in questions
            assert (i.gate_margin > 0) if gated else i.gate_margin is None
        lost_behind_a_gate += lost.count if gated else 0
        opened = e.retain_text_opened
        assert all(r.gate_margin > 0 and r.item for r in opened) and (gated or opened == [])
        assert [r.gate_margin for r in opened] == sorted((r.gate_margin for r in opened), reverse=True)
    assert lost_behind_a_gate > 0, "the check above needs a gated setting that loses a question"


def test_hub_mcq_is_mapped_like_jsonl(monkeypatch):
    import datasets

    rows = [{"question": "Which?", "choices": ["a", "b", "c", "d"], "answer": 2, "subject": "bio"},
            {"question": "What?", "choices": ["e", "f", "g", "h"], "answer": 0, "subject": "bio"}]
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    qs = load_mcq("cais/wmdp:wmdp-bio", "forget", limit=1)
    assert calls == [("cais/wmdp", "wmdp-bio", "test")]
    assert [(q.question, q.choices, q.answer) for q in qs] == [("Which?", ["a", "b", "c", "d"], 2)]
    load_mcq("cais/mmlu:college_biology@validation", "retain")
    assert calls[-1] == ("cais/mmlu", "college_biology", "validation")

    def offline(*_a, **_k):
        raise ConnectionError("Couldn't reach 'cais/wmdp' on the Hub (LocalEntryNotFoundError)\nmore")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(EvalError, match=r"^cannot load MCQ dataset 'cais/wmdp:wmdp-bio': Couldn't reach [^\n]*$"):
        load_mcq("cais/wmdp:wmdp-bio", "forget")


def test_demo_preset_measures_losses_for_the_best_setting_only(lm, cfg, tmp_path):
    demo = EvalConfig.preset("demo")
    assert demo.max_questions is None and demo.ood_forget_mcq == "demo-ood"
    assert EvalConfig.from_dict(json.loads(json.dumps(demo.to_dict()))) == demo
    with pytest.raises(EvalError, match="unknown eval preset"):
        EvalConfig.preset("huge")
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    res = evaluate_run(run, lm, cfg.replace(sweep_losses=False, retain_ratio=0.0), progress=False)
    best = res.best
    assert best is not None, res.best_reason  # retain_ratio 0: every setting with features qualifies
    others = [e for e in res.sweep if e.label != best.label]
    assert others and all(e.forget_loss.after is None and e.retain_mcq.after is not None for e in others)
    assert best.forget_loss.after is not None and best.retain_loss.after is not None
    full = evaluate_run(run, lm, cfg.replace(retain_ratio=0.0), progress=False)
    assert full.best.label == best.label
    assert full.best.forget_loss.to_dict() == pytest.approx(best.forget_loss.to_dict())


def test_without_sweep_losses_the_retain_ce_still_decides_retain_safety(lm, cfg, tmp_path):
    """sweep_losses False (the demo): every setting that keeps the retain dev questions gets its
    held-out retain CE measured, and a rise above max_retain_ce_rise disqualifies it; a setting
    that already loses retain questions is not measured."""
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    res = evaluate_run(run, lm, cfg.replace(sweep_losses=False, retain_ratio=0.0, max_retain_ce_rise=-0.5),
                       progress=False)
    edits = [e for e in res.sweep if e.n_features > 0]
    assert edits and all(e.retain_loss.after is not None and e.forget_loss.after is None for e in edits)
    assert res.best is None and "retain CE rise" in res.best_reason, "no setting halves the retain CE"
    res = evaluate_run(run, lm, cfg.replace(sweep_losses=False, retain_ratio=2.0), progress=False)
    assert all(e.retain_loss.after is None for e in res.sweep)


def test_ff_eval_cli_prints_best_per_gate_and_json_keys(lm, cfg, tmp_path, tiny_model):
    from click.testing import CliRunner

    from cli import main

    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, model=tiny_model)
    args = ["eval", "--run", str(run), "--forget-mcq", cfg.forget_mcq, "--retain-mcq", cfg.retain_mcq,
            "--set", f"forget_text={cfg.forget_text}", "--set", f"retain_text={cfg.retain_text}",
            "--set", "max_text_tokens=200", "--no-ood", "--set", "multipliers=5", "--set", "top_n=10",
            "--set", "selections=candidates", "--quiet"]
    r = CliRunner().invoke(main, args + ["--json", "--set", "max_retain_ce_rise=0.25", "--set", "probe_multipliers=7",
                                         "--set", "gate_window=6", "--set", r"mcq_template=Q: {question}\nA:"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output[r.output.index("{"):])
    assert res["config"]["max_retain_ce_rise"] == 0.25 and res["config"]["max_ood_retain_ce_rise"] == 0.5
    assert res["config"]["mcq_template"] == "Q: {question}\nA:"
    assert {e["setting"]["gate"]: e["setting"].get("gate_window") for e in res["sweep"]} == {
        "none": None, "sequence": None, "probe": 6}
    for flag, value, message in (("--set", "mcq_template=Q: {q}", "may name {question} only"),
                                 ("--set", "mcq_template=Q:", "must hold {question} once"),
                                 ("--set", "gate_window=0", "gate_window must be at least 1 token (or none)")):
        bad = CliRunner().invoke(main, args + [flag, value])
        assert bad.exit_code == 2 and message in bad.output and len(bad.output.strip().splitlines()) == 1
    for retired in ("--probe-ramps", "--probe-pools"):  # measured, never chosen, gone (docs/results.md)
        bad = CliRunner().invoke(main, args + [retired, "mean"])
        assert bad.exit_code == 2 and f"No such option '{retired}'" in bad.output
    assert {e["setting"]["multiplier"] for e in res["sweep"] if e["setting"]["gate"] == "probe"} == {7.0}
    assert {e["setting"]["multiplier"] for e in res["sweep"] if e["setting"]["gate"] != "probe"} == {5.0}
    assert set(res["best_by_gate"]) == {"none", "sequence", "probe"}
    for gate, g in res["best_by_gate"].items():
        b = g["best"]
        assert (b is None) == (g["reason"] is not None)
        if b is not None:
            assert b["setting"]["gate"] == gate and b["unlearning_score"] == b["test"]["unlearning_score"]
            for part in ("dev", "test"):
                assert {"unlearning_score", "forget_mcq", "retain_mcq", "correct_subset_score"} <= set(b[part])
            assert len(b["test"]["ci95"]) == 2 and b["gate"]["mode"] == gate
            assert {"auroc_text", "auroc_mcq", "auroc_text_ood", "auroc_mcq_ood"} <= set(b["selection"])
            opened = b["gate"]["open_rate_questions"]  # test-half questions the gate opens on (no OOD sets)
            assert set(opened) == {"forget", "retain"} and all(0 <= v <= 1 for v in opened.values())
            if gate == "none":
                assert opened == {"forget": 1.0, "retain": 1.0}
            sp = b["gate"]["forget_split"]  # the test half, split by where the gate opened
            assert sp["opened"]["questions"] + sp["shut"]["questions"] == b["test"]["questions"]
            assert sp["opened"]["questions"] == round(opened["forget"] * b["test"]["questions"])
            n_o, n_s = sp["opened"]["questions"], sp["shut"]["questions"]
            acc = lambda part, k: 0.0 if sp[part]["questions"] == 0 else sp[part][k]  # noqa: E731
            for k in ("before", "after"):
                assert abs((n_o * acc("opened", k) + n_s * acc("shut", k)) / (n_o + n_s)
                           - b["test"]["forget_mcq"][k]) < 1e-9
            assert gate != "none" or sp["shut"]["questions"] == 0
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and "best, gate none:" in r.output and "best, gate sequence:" in r.output
    assert not (run / "unlearning.json").exists()  # ff eval writes nothing without --save
    r = CliRunner().invoke(main, args + ["--save", "--json"])
    assert r.exit_code == 0, r.output
    saved = json.loads((run / "unlearning.json").read_text())  # what ff generate and unlearned() apply
    assert saved == json.loads(r.output[r.output.index("{"):]) and not list(run.glob("*.tmp"))


def test_probe_gate_threshold_comes_from_retain_dev_questions_only(lm, cfg, tmp_path):
    """gate_calibration "dev": the probe threshold is the percentile of the retain dev questions'
    peak scores; the test half never enters (changing it leaves the threshold unchanged)."""
    from safetensors.torch import load_file, save_file

    from pipelines.evaluate import calibrate_probe

    path = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    gate = load_file(str(path / "gate.safetensors"))  # training contexts score far above the questions,
    gate["probe/max"] = gate["probe/max"] + 50.0      # as 128-token prose does on the demo
    save_file(gate, str(path / "gate.safetensors"))
    run = load_run(path)
    data = eval_data(lm, cfg)
    data.prepare(lm.model, LAYER)
    settings = [Setting(mode="clamp", multiplier=5.0, top_n=10, gate="probe", gate_percentile=p) for p in (50.0, 100.0)]
    got = calibrate_probe(settings + [Setting(gate="none")], run, data, cfg)
    assert got[-1] == Setting(gate="none"), "other gates are left alone"
    iv = Intervention(run, settings[0].replace(gate_threshold=0.0))
    peak_Q = data.retain_mcq.gate_peaks(iv)
    dev_Q = ~data.retain_mcq.test_Q
    bias = float(run.gate["probe/b"][0])
    for s, p in zip(got, (0.5, 1.0)):
        assert s.gate_threshold == pytest.approx(float(torch.quantile(peak_Q[dev_Q].double(), p)) + bias)
    assert Setting.from_dict(got[1].to_dict()) == got[1]
    assert calibrate_probe(settings[1:], run, data, cfg) == [got[1]], "a setting alone calibrates the same"
    # the peak is what the gate sees: at a threshold just below a dev question's peak it opens there
    q = int(torch.nonzero(dev_Q)[0])
    below = Intervention(run, settings[0].replace(gate_threshold=float(peak_Q[q]) + bias - 1e-4))
    above = Intervention(run, settings[0].replace(gate_threshold=float(peak_Q[q]) + bias + 1e-4))
    assert float(below.threshold) < float(peak_Q[q]) < float(above.threshold)
    assert calibrate_probe(settings, run, data, cfg.replace(gate_calibration="train")) == settings


def test_probe_detector_is_chosen_on_the_forget_dev_questions(lm, cfg, tmp_path):
    """Of the run's detectors (one per L2 penalty, and the "mlp" one), calibrate_probe keeps the
    one whose gate, at the highest percentile asked for, opens on the most forget dev questions
    (ties: the first stored), with that detector's own thresholds; the chosen detector is what
    the setting then gates with."""
    from safetensors.torch import load_file, save_file

    from pipelines.evaluate import calibrate_probe

    path = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, mlp_probe=True)
    gate = load_file(str(path / "gate.safetensors"))
    gate.update({"probe@0.01/w": -gate["probe/w"], "probe@0.01/b": torch.tensor([0.7]),
                 "probe@0.01/max": gate["probe/max"] + 1})
    save_file(gate, str(path / "gate.safetensors"))
    run = load_run(path)
    assert run.gate.detectors() == [("linear", None), ("linear", 0.01), ("mlp", None)]
    data = eval_data(lm, cfg)
    data.prepare(lm.model, LAYER)
    settings = [Setting(mode="clamp", multiplier=5.0, top_n=10, gate="probe", gate_percentile=p) for p in (50.0, 90.0)]

    def calibration(kind, l2):
        iv = Intervention(run, settings[0].replace(gate_threshold=0.0, probe_l2=l2, probe_kind=kind))
        def dev(n):
            return getattr(data, n).gate_peaks(iv)[~getattr(data, n).test_Q].double()

        r = torch.cat([dev(n) for n in ("retain_mcq", "ood_retain_mcq") if data.has(n)])
        thr = {p: float(torch.quantile(r, p)) for p in (0.5, 0.9)}
        return thr, float((dev("forget_mcq") > thr[0.9]).double().mean()), iv.detector.b

    cals = [calibration(*d) for d in run.gate.detectors()]
    assert len({c[1] for c in cals}) > 1, "the detectors must open on different shares for the test to decide"
    best = max(range(len(cals)), key=lambda i: (cals[i][1], -i))
    (kind, want), (thr, _, bias) = run.gate.detectors()[best], cals[best]
    got = calibrate_probe(settings, run, data, cfg)
    assert [(s.probe_kind, s.probe_l2) for s in got] == [(kind, want)] * 2
    for s, p in zip(got, (0.5, 0.9)):
        assert s.gate_threshold == pytest.approx(thr[p] + bias)
    assert Setting.from_dict(got[0].to_dict()) == got[0], "the choice round-trips through unlearning.json"
    # a setting that names its detector is calibrated with that one only
    mlp = calibrate_probe([settings[1].replace(probe_kind="mlp")], run, data, cfg)[0]
    assert mlp.probe_kind == "mlp" and mlp.gate_threshold == pytest.approx(cals[2][0][0.9] + cals[2][2])
    with pytest.raises(EvalError, match="no probe gate fitted with L2 0.001"):
        Intervention(run, settings[0].replace(probe_l2=0.001))


class _Unread:
    """Evaluation data that fails when read: a refusal must come before the clean passes."""

    def __getattr__(self, name):
        raise AssertionError(f"the evaluation read its data ({name}) before refusing the run")


def test_a_run_without_a_probe_gate_is_refused_before_the_clean_passes(lm, cfg, tmp_path):
    from safetensors.torch import load_file, save_file

    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)
    gate = {k: v for k, v in load_file(str(run / "gate.safetensors")).items() if not k.startswith("probe/")}
    save_file(gate, str(run / "gate.safetensors"))
    with pytest.raises(EvalError, match="no probe gate.*--set gates=both"):
        evaluate_run(run, lm, cfg.replace(grid=replace(cfg.grid, gates=("none", "probe"))), progress=False)
    d_sae = len(load_file(str(run / "features.safetensors"))["freq_r"])  # an older probe on SAE features
    save_file({**gate, "probe/w": torch.ones(d_sae), "probe/b": torch.zeros(1), "probe/max": torch.zeros(4)},
              str(run / "gate.safetensors"))
    with pytest.raises(EvalError, match="no probe gate on the residual stream.*--set gates=both"):
        evaluate_run(run, lm, cfg.replace(grid=replace(cfg.grid, gates=("none", "probe"))), progress=False)
    # ff generate / the Python API
    with pytest.raises(EvalError, match=r"no probe gate on the residual stream.*\(--set gate=sequence\)"):
        Intervention(load_run(run), Setting(mode="clamp", multiplier=5.0, top_n=10, gate="probe"))
    # a run without its probe's training calibration, asked to calibrate from training
    older = {k: v for k, v in load_file(str(make_run(tmp_path / "run2", lm.info.d_model, LAYER, lm.info.weights_hash)
                                             / "gate.safetensors")).items() if not k.endswith("/max")}
    save_file(older, str(tmp_path / "run2" / "gate.safetensors"))
    trained = cfg.replace(gate_calibration="train", grid=replace(cfg.grid, gates=("probe",)))
    with pytest.raises(EvalError, match="no training calibration of its probe gate"):
        evaluate_run(tmp_path / "run2", lm, trained, data=_Unread(), progress=False)
    save_file(gate, str(run / "gate.safetensors"))
    small = cfg.replace(grid=replace(cfg.grid, gates=("none", "sequence"), multipliers=(5.0,), top_n=(10,),
                                     selections=("candidates",)))
    res = evaluate_run(run, lm, small, progress=False)
    assert set(res.best_by_gate) == {"none", "sequence"}


def test_a_windowed_probe_gate_calibrates_on_its_own_windowed_dev_peaks(lm, cfg, tmp_path):
    """gate_window: the grid puts the window on probe-gated settings only; the threshold is the
    percentile of the retain dev questions' peaks of the windowed mean, which differ from the
    mean from the start once a prompt is longer than the window."""
    from pipelines.evaluate import calibrate_probe

    grid = SweepGrid(multipliers=(5.0,), top_n=(10,), selections=("saebench",), gates=("none", "probe"),
                     probe_percentiles=(90.0,), gate_window=3)
    windows = {s.gate: s.gate_window for s in grid.settings("baseline")}
    assert windows == {"none": None, "probe": 3}
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash))
    data = eval_data(lm, cfg)
    data.prepare(lm.model, LAYER)
    plain = Setting(mode="clamp", multiplier=5.0, top_n=10, gate="probe", gate_percentile=90.0)
    windowed = plain.replace(gate_window=3)
    got_plain, got_win = calibrate_probe([plain, windowed], run, data, cfg)
    assert got_win.gate_window == 3 and got_plain.gate_window is None
    peak_Q = data.retain_mcq.gate_peaks(Intervention(run, windowed.replace(gate_threshold=0.0)))
    assert not torch.equal(peak_Q, data.retain_mcq.gate_peaks(Intervention(run, plain.replace(gate_threshold=0.0))))
    dev_Q = ~data.retain_mcq.test_Q
    bias = float(run.gate["probe/b"][0])
    assert got_win.gate_threshold == pytest.approx(float(torch.quantile(peak_Q[dev_Q].double(), 0.9)) + bias)


def test_rerun_from_the_first_edited_position_equals_rerunning_whole_rows(lm, cfg, tmp_path):
    """With the clean keys and values kept (EvalConfig.kv_cache_gib), a setting reruns each row
    only from its first edited position: same log-probs as rerunning the whole rows (questions,
    tree-packed, and text), for a gated clamp, a static clamp and the probe gate on an earlier
    layer; fewer tokens through the blocks above the layer where the gate opens mid-row."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, probe_layer=LAYER - 1))
    verify_fast_path(lm.model, LAYER)
    whole, part = eval_data(lm, cfg.replace(kv_cache_gib=0.0)), eval_data(lm, cfg.replace(kv_cache_gib=1.0))
    whole.prepare(lm.model, [LAYER - 1, LAYER], kv_above=LAYER)  # no budget: nothing kept
    part.prepare(lm.model, [LAYER - 1, LAYER], kv_above=LAYER)
    assert whole.forget_mcq.kv is None and part.forget_mcq.kv is not None
    probe = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0))
    thr = float(part.forget_mcq.gate_peaks(probe).median()) + float(run.gate["probe/b"][0])
    settings = (Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=thr),
                Setting(gate="sequence", mode="clamp", multiplier=5.0, gate_window=4, gate_threshold=0.5),
                Setting(gate="none", mode="clamp", multiplier=5.0))
    for setting in settings:
        iv = Intervention(run, setting)
        for name in ("forget_mcq", "retain_mcq", "forget_text", "retain_text"):
            a, b = getattr(whole, name), getattr(part, name)
            a.tokens_rerun = b.tokens_rerun = 0
            lp_a, rerun_a = a.logprobs(lm.model, iv)
            lp_b, rerun_b = b.logprobs(lm.model, iv)
            assert rerun_a == rerun_b
            torch.testing.assert_close(torch.cat(lp_b), torch.cat(lp_a), atol=2e-5, rtol=1e-5)
            assert b.tokens_rerun <= a.tokens_rerun
            if setting.gate == "probe" and name == "forget_text":
                assert 0 < b.tokens_rerun < a.tokens_rerun



def test_without_reuse_every_row_runs_through_the_whole_model_with_the_same_scores(lm, cfg, tmp_path):
    """EvalConfig.reuse=False: each setting reruns every row from the embeddings (the blocks below
    the layer again, the gate reading their output), and scores as the reusing path does, for a
    static clamp, a windowed sequence gate and the probe gate on an earlier layer."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, probe_layer=LAYER - 1))
    verify_fast_path(lm.model, LAYER)
    fast, slow = eval_data(lm, cfg.replace(kv_cache_gib=1.0)), eval_data(lm, cfg.replace(reuse=False))
    for d in (fast, slow):
        d.prepare(lm.model, [LAYER - 1, LAYER], kv_above=LAYER)
    assert slow.forget_mcq.kv is None and not slow.forget_mcq.reuse and fast.forget_mcq.reuse
    probe = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0))
    thr = float(fast.forget_mcq.gate_peaks(probe).median()) + float(run.gate["probe/b"][0])
    for setting in (Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=thr),
                    Setting(gate="sequence", mode="clamp", multiplier=5.0, gate_window=4, gate_threshold=0.5),
                    Setting(gate="none", mode="clamp", multiplier=5.0)):
        iv = Intervention(run, setting)
        for name in ("forget_mcq", "retain_mcq", "forget_text", "retain_text"):
            a, b = getattr(fast, name), getattr(slow, name)
            b.tokens_rerun = 0
            lp_a, rerun_a = a.logprobs(lm.model, iv)
            lp_b, rerun_b = b.logprobs(lm.model, iv)
            assert rerun_b == b.n_rows >= rerun_a
            assert b.tokens_rerun == sum(int((x.seg_BT >= 0).sum()) for x in b.batches)
            torch.testing.assert_close(torch.cat(lp_b), torch.cat(lp_a), atol=2e-5, rtol=1e-5)
            assert a.run(lm.model, iv).correct_Q is None or torch.equal(a.run(lm.model, iv).correct_Q,
                                                                        b.run(lm.model, iv).correct_Q)


def test_the_out_of_distribution_ce_bound_follows_the_in_distribution_one():
    """One rule, in the config's owner: the OOD retain-CE bound is OOD_CE_FACTOR times the other,
    by default and when only the in-distribution bound changes; set both and both hold."""
    from pipelines.config import OOD_CE_FACTOR

    cfg = EvalConfig()
    assert cfg.max_ood_retain_ce_rise == pytest.approx(OOD_CE_FACTOR * cfg.max_retain_ce_rise)
    assert cfg.replace(max_retain_ce_rise=0.05).max_ood_retain_ce_rise == pytest.approx(OOD_CE_FACTOR * 0.05)
    both = cfg.replace(max_retain_ce_rise=0.05, max_ood_retain_ce_rise=0.07)
    assert (both.max_retain_ce_rise, both.max_ood_retain_ce_rise) == (0.05, 0.07)
    assert cfg.replace(bootstrap=10).max_ood_retain_ce_rise == cfg.max_ood_retain_ce_rise
