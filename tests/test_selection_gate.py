"""Feature selection, the sequence gate and its calibration (trainer/stats.py, trainer/gate/select.py), sound
evaluation (pipelines/scoring.py, the dev/test split) and the equal-statistics rule."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from pipelines.config import Setting
from pipelines.data import Question, sample_split
from pipelines.errors import EvalError
from pipelines.intervene import Intervention, load_run
from pipelines.scoring import auroc, bootstrap_ci, gate_split, half, paired_difference, unbits, verdict
from trainer.gate.calibrate import calibrate, threshold_at
from trainer.gate.causal import carry, firing_share, gate_open, prefix_counts, row_share
from trainer.gate.select import select
from trainer.sae import SAE
from trainer.stats import corpus_stats

LAYER = 1


# ---- the gate ----------------------------------------------------------------------------


def test_prefix_counts_follow_tree_packed_segments():
    x = torch.tensor([[1, 0, 1, 1, 1, 0, 1, 0]], dtype=torch.float32)
    seg = torch.tensor([[0, 0, 0, 1, 1, 2, 2, -1]])
    # prompt: 1, 1, 2; branch 1 continues from the prompt's 2: 3, 4; branch 2 from 2: 2, 3
    assert prefix_counts(x, seg)[0, :7].tolist() == [1, 1, 2, 3, 4, 2, 3]
    assert prefix_counts(x)[0].tolist() == [1, 1, 2, 3, 4, 4, 5, 5]


def test_gate_opens_only_above_threshold_after_enough_tokens():
    fires = torch.tensor([[1, 1, 0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    editable = torch.ones_like(fires)
    share, seen = firing_share(fires, editable)
    assert share[0].tolist() == pytest.approx([1, 1, 2 / 3, 0.5, 0.4, 1 / 3, 3 / 7, 0.5])
    open_ = gate_open(share, seen, threshold=0.45, min_tokens=4)
    assert open_[0].tolist() == [False, False, False, True, False, False, False, True]
    # counts carried in from earlier KV-cached calls continue the same sequence
    share2, seen2 = firing_share(fires[:, 4:], editable[:, 4:], start=(share[:, 3:4] * 4, seen[:, 3:4]))
    torch.testing.assert_close(share2, share[:, 4:])


def _window_by_hand(x, e, seg, window):
    """The mean of x over the last `window` editable tokens each position sees, by enumeration."""
    out = torch.zeros(x.shape)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            if seg is None:
                seen = range(t + 1)
            elif seg[b, t] == 0:
                seen = [s for s in range(t + 1) if seg[b, s] == 0]
            else:
                seen = [s for s in range(t + 1) if seg[b, s] in (0, seg[b, t])]
            kept = [s for s in seen if e[b, s]][-window:]
            out[b, t] = sum(float(x[b, s]) for s in kept) / max(1, len(kept))
    return out


@pytest.mark.parametrize("window", [1, 3, 5, 40])
def test_windowed_share_is_the_mean_of_the_last_editable_tokens(window):
    g = torch.Generator().manual_seed(window)
    x = torch.randn(3, 20, generator=g)
    e = torch.rand(3, 20, generator=g) > 0.25
    share, seen = firing_share(x, e, window=window)
    torch.testing.assert_close(share, _window_by_hand(x, e, None, window))
    assert torch.equal(seen, firing_share(x, e)[1]), "tokens seen count from the start, window or not"
    if window >= 20:  # a window longer than the row is the mean from the start
        torch.testing.assert_close(share, firing_share(x, e)[0])
    # tree-packed rows: a branch's window reaches back into the shared prompt, never into another branch
    seg = torch.tensor([[0] * 8 + [1] * 4 + [2] * 4 + [3] * 4, [0] * 10 + [1] * 5 + [2] * 5,
                        [0] * 12 + [1] * 4 + [-1] * 4])
    share, seen = firing_share(x, e, seg, window=window)
    real = seg >= 0
    torch.testing.assert_close(share[real], _window_by_hand(x, e, seg, window)[real])
    # KV-cached pieces carry the window's tail: they continue the same sequence exactly
    start, parts = None, []
    for lo, hi in ((0, 6), (6, 7), (7, 15), (15, 20)):
        parts.append(firing_share(x[:, lo:hi], e[:, lo:hi], start=start, window=window))
        start = carry(start, x[:, lo:hi], e[:, lo:hi], window=window)
    torch.testing.assert_close(torch.cat([p[0] for p in parts], 1), firing_share(x, e, window=window)[0])
    assert torch.equal(torch.cat([p[1] for p in parts], 1), firing_share(x, e)[1])


def test_a_window_is_needed_to_continue_a_windowed_gate():
    x, e = torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="carried tail"):
        firing_share(x, e, start=carry(None, x, e), window=3)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, device="cpu")


def test_gate_is_causal_a_later_token_never_changes_an_earlier_output(lm, tmp_path):
    """Changing token t changes no output at positions < t, with the gate in the model."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40))
    setting = Setting(mode="clamp", multiplier=30.0, top_n=20, gate="sequence", gate_percentile=0.0)
    iv = Intervention(run, setting)
    assert iv.threshold is not None
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, 24), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    with torch.no_grad(), iv.hooked(lm.model):
        base = lm.model(ids).logits
        opened = False
        for t in (6, 12, 20):
            alt = ids.clone()
            alt[:, t] = (alt[:, t] + 7) % (lm.model.config.vocab_size - 4) + 4
            out = lm.model(alt).logits
            assert torch.equal(out[:, :t], base[:, :t]), f"a change at {t} leaked backwards"
            opened |= not torch.allclose(out[:, t:], base[:, t:])
    with torch.no_grad():
        clean = lm.model(ids).logits
    assert opened and not torch.allclose(clean, base), "the gate must open somewhere for the test to mean anything"


def test_gated_generation_with_kv_cache_equals_full_recompute(lm, tmp_path):
    """The hook keeps the gate's counts across KV-cached steps: greedy generation with the cache
    gives the tokens that a full forward per step gives."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40))
    iv = Intervention(run, Setting(mode="clamp", multiplier=30.0, top_n=20, gate="sequence", gate_percentile=50.0))
    ids = torch.tensor([[lm.model.config.bos_token_id, 5, 9, 11, 7, 13, 6]])
    with torch.no_grad(), iv.hooked(lm.model):
        cached = lm.model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids
        for _ in range(8):
            nxt = lm.model(seq).logits[:, -1].argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


def test_calibration_threshold_is_the_retain_percentile():
    sae = SAE(4, 6, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.zero_()
        sae.b_dec.zero_()
        sae.W_enc[0, 0] = 1.0  # feature 0 fires exactly where x[..., 0] > 0
        sae.b_enc.zero_()
    x = torch.zeros(3, 5, 4)
    x[0, 1:5, 0] = 1.0  # context 0: fires on 4 of 4 editable tokens
    x[1, 1:3, 0] = 1.0  # context 1: 2 of 4
    editable = torch.ones(3, 5, dtype=torch.bool)
    editable[:, 0] = False  # BOS
    shares = calibrate(sae, [(x, editable)], {"s": torch.tensor([0])})["s"]
    assert shares.tolist() == [1.0, 0.5, 0.0]
    assert threshold_at(shares, 50) == 0.5
    assert row_share(torch.tensor([[True, False]]), torch.tensor([[True, True]])).item() == 0.5


# ---- selection and statistics -------------------------------------------------------------


def test_context_cap_drops_features_that_fire_in_most_retain_contexts():
    feats = {"freq_r": torch.tensor([0.001, 0.002, 0.003]), "freq_u": torch.tensor([0.5, 0.3, 0.1]),
             "ctx_r": torch.tensor([0.9, 0.01, 0.02])}  # feature 0: a template token in every context
    assert select(feats, "saebench", 2).tolist() == [0, 1]
    assert select(feats, "saebench", 2, max_ctx_r=0.05).tolist() == [1, 2]
    x = torch.zeros(2, 4, 3)
    x[0, 1, 0] = 1.0  # context 0 fires once at token 1, context 1 never
    sae = SAE(3, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        sae.W_enc.zero_(), sae.b_enc.zero_(), sae.b_dec.zero_()
        sae.W_enc[0, 0] = 1.0
    m = torch.ones(2, 4, dtype=torch.bool)
    m[:, 0] = False
    st = corpus_stats(sae, [(x, m)], l1=0.0)
    assert st["ctx"].tolist() == [0.5, 0.0] and st["freq"][0].item() == pytest.approx(1 / 6)


def test_ratio_selection_needs_rare_retain_firing_and_ranks_by_ratio():
    feats = {"mean_sq_u": torch.tensor([9.0, 8.0, 1.0, 7.0, 0.0]), "mean_sq_r": torch.tensor([9.0, 1.0, 0.1, 0.5, 0.0]),
             "freq_r": torch.tensor([0.5, 0.001, 0.001, 0.002, 0.0])}
    # feature 0 fires on half of retain tokens: excluded however large its forget score
    assert select(feats, "ratio", 2, freq_threshold=0.01, ratio_percentile=0.0).tolist() == [2, 3]  # ratios 10, 14
    assert select(feats, "ratio", 2, freq_threshold=0.01, ratio_percentile=50.0).tolist() == [1, 3]


def test_both_methods_get_the_same_statistics_estimator(tmp_path):
    """The equal-statistics rule: `ff train` measures every method's features with one pass of
    corpus_stats over every training token; check that estimator against the formula."""
    from trainer.config import TrainConfig
    from trainer.train import train_on_streams

    g = torch.Generator().manual_seed(0)
    sae = SAE(8, 16, generator=g)
    x = torch.randn(50, 8, generator=g)
    st = corpus_stats(sae, x.split(7), l1=0.5)
    f = sae.encode(x).detach()
    grad = 2 * (sae.decode(f) - x) @ sae.W_dec.T + 0.5
    torch.testing.assert_close(st["freq"], (f > 0).float().mean(0))
    torch.testing.assert_close(st["mean_sq"], f.pow(2).mean(0))
    torch.testing.assert_close(st["alpha"], (grad.abs() * (f > 0)).mean(0), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st["act"], f.sum(0) / (f > 0).sum(0).clamp_min(1))
    # through the trainer: both methods write the same keys from the same estimator
    from safetensors.torch import load_file

    cfg = TrainConfig.preset("demo").replace(steps=6, warmup=1, batch_contexts=2, expansion=2, n_clusters=2,
                                             recluster_every=2, importance_batches=2, log_every=1,
                                             checkpoint_every=100)
    keys = []
    for method in ("featureforget", "baseline"):
        r = (x[torch.randint(0, 50, (16,), generator=g)] for _ in iter(int, 1))
        u = (x[torch.randint(0, 50, (16,), generator=g)] + 1 for _ in iter(int, 1))
        out = tmp_path / method
        train_on_streams(cfg.replace(method=method), r, u, d_model=8, out=out)
        keys.append({k for k in load_file(str(out / "features.safetensors"))
                     if k not in ("candidate", "cluster") and not k.startswith("train_")})
    assert keys[0] == keys[1] and {"freq_r", "mean_sq_u", "act_u", "alpha_r"} <= keys[0]


# ---- sound evaluation -----------------------------------------------------------------------


def test_dev_and_test_halves_are_disjoint_seeded_samples():
    qs = [Question(f"q{i}", ["a", "b"], i % 2) for i in range(41)]
    sample, test = sample_split(qs, None, seed=0)
    assert sorted(q.question for q in sample) == sorted(q.question for q in qs)
    dev_q = {q.question for q, t in zip(sample, test) if not t}
    test_q = {q.question for q, t in zip(sample, test) if t}
    assert not dev_q & test_q and len(dev_q) == 20 and len(test_q) == 21
    assert [q.question for q in sample][:5] != [f"q{i}" for i in range(5)], "a random sample, not the first rows"
    again, _ = sample_split(qs, None, seed=0)
    assert [q.question for q in again] == [q.question for q in sample]
    sub, sub_test = sample_split(qs, 10, seed=1)
    assert len(sub) == 10 and int(sub_test.sum()) == 5


def test_bootstrap_interval_on_known_cases():
    before = torch.ones(100, dtype=torch.bool)
    after = torch.zeros(100, dtype=torch.bool)
    assert bootstrap_ci(before, after, n=500) == [1.0, 1.0]  # everything forgotten: no spread
    after[:50] = True  # score 0.5; the interval of a mean of 100 Bernoulli(0.5) is about +-0.1
    lo, hi = bootstrap_ci(before, after, n=4000, seed=1)
    assert 0.38 < lo < 0.42 and 0.58 < hi < 0.62
    h = half((before, after), (before, before), torch.ones(100, dtype=torch.bool),
             torch.ones(100, dtype=torch.bool), bootstrap=500)
    assert h.unlearning_score == 0.5 and h.correct_subset_score == 0.5 and len(h.ci95) == 2
    # the half's per-question answers, for paired comparisons in the report
    assert torch.equal(unbits(h.forget_correct.after), after)
    assert torch.equal(unbits(h.forget_correct.before), before)
    every = torch.ones(100, dtype=torch.bool)
    small = half((before, after), (before, before), every, every)
    assert "forget_correct" not in small.to_dict() and "ci95" not in small.to_dict()  # the sweep's entries stay small


def test_paired_difference_on_known_cases():
    before = torch.ones(100, dtype=torch.bool)
    a, b = torch.zeros(100, dtype=torch.bool), torch.zeros(100, dtype=torch.bool)
    a[:30], b[:50] = True, True  # A: score 0.7, B: 0.5, and A keeps a subset of what B keeps
    diff, (lo, hi) = paired_difference(before, a, b, n=4000, seed=1)
    assert abs(diff - 0.2) < 1e-12 and lo < 0.2 < hi
    # paired: only the 20 questions where the two differ vary the difference, so its interval is
    # narrower than either score's own (about +-0.09 each here)
    assert 0.11 < lo < 0.15 and 0.25 < hi < 0.29
    assert paired_difference(before, a, a, n=500) == (0.0, [0.0, 0.0])  # the same answers: no difference at all
    swapped = paired_difference(before, b, a, n=4000, seed=1)
    assert abs(swapped[0] + 0.2) < 1e-12 and abs(swapped[1][0] + hi) < 1e-9 and abs(swapped[1][1] + lo) < 1e-9
    before[:40] = False  # 60 known: the difference of the two unlearning scores, 1 - after / before each
    diff, _ = paired_difference(before, a, b, n=200)
    assert abs(diff - ((1 - 30 / 60) - (1 - 50 / 60))) < 1e-12
    assert paired_difference(torch.zeros(5, dtype=torch.bool), a[:5], b[:5]) is None  # nothing known


def test_gate_split_on_a_known_case():
    # 8 questions of the half (2 more outside it): 4 opened (3 known before, 1 after), 4 shut (2 known, kept)
    before = torch.tensor([1, 1, 1, 0, 1, 1, 0, 0, 1, 1], dtype=torch.bool)
    after = torch.tensor([0, 1, 0, 0, 1, 1, 0, 0, 0, 0], dtype=torch.bool)
    opened = torch.tensor([1, 1, 1, 1, 0, 0, 0, 0, 1, 0], dtype=torch.bool)
    half_Q = torch.tensor([1] * 8 + [0, 0], dtype=torch.bool)
    k = torch.tensor([4, 4, 2, 2, 4, 4, 4, 4, 4, 4])
    sp = gate_split(before, after, opened, half_Q, k)
    assert sp.to_dict()["opened"] == {"questions": 4, "before": 0.75, "after": 0.25}
    assert sp.to_dict()["shut"] == {"questions": 4, "before": 0.5, "after": 0.5}
    # ceiling: opened at chance (1/4 + 1/4 + 1/2 + 1/2 = 1.5) plus shut as clean (2) over 8, against 5/8
    assert abs(sp.ceiling - (1 - (3.5 / 8) / (5 / 8))) < 1e-12
    no_gate = gate_split(before, after, torch.ones(10, dtype=torch.bool), half_Q, k)
    assert no_gate.shut.questions == 0 and no_gate.ceiling > sp.ceiling


def test_auroc_and_verdict():
    assert auroc(torch.tensor([3.0, 4.0]), torch.tensor([1.0, 2.0])) == 1.0
    assert auroc(torch.tensor([1.0]), torch.tensor([1.0])) == 0.5
    assert auroc(torch.tensor([0.0, 2.0]), torch.tensor([1.0, 3.0])) == 0.25
    assert "beats" in verdict([0.5, 0.7], [0.1, 0.4], "A", "B")
    assert "within noise" in verdict([0.3, 0.7], [0.1, 0.4], "A", "B")
    assert "not comparable" in verdict(None, [0.1, 0.4], "A", "B")
    assert np.isclose(auroc(torch.arange(10.0), torch.arange(10.0) + 100), 0.0)


# ---- the probe gate (trainer/gate/detector.py) ---------------------------------------------------


def _marked_contexts(n: int, marker: int, seed: int, T: int = 40) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n contexts in blocks of 4 (x [4, T, 4]): direction `marker` is 1 on ~30% of tokens,
    direction 2 (shared by both corpora) on ~50%, direction 3 always 0; position 0 is BOS (not
    editable)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, T, 4)
    x[..., marker] = (torch.rand(n, T, generator=g) < 0.3).float()
    x[..., 2] = (torch.rand(n, T, generator=g) < 0.5).float()
    m = torch.ones(n, T, dtype=torch.bool)
    m[:, 0] = False
    return [(x[i:i + 4], m[i:i + 4]) for i in range(0, n, 4)]


def test_probe_learns_the_topic_directions_and_calibrates_on_unseen_retain_contexts():
    from trainer.gate.detector import fit_probe, max_score, token_scores

    retain, unlearn = _marked_contexts(24, 1, 0), _marked_contexts(24, 0, 1)
    reads = []

    def retain_fn():  # read twice: to fit, then to calibrate
        reads.append(1)
        return iter(retain)

    probe = fit_probe(retain_fn, unlearn, n_retain=24, n_unlearn=24, lengths=(8, 16))
    assert len(reads) == 2
    assert probe.w_D[0] > 0 > probe.w_D[1], "unlearn marker up, retain marker down"
    assert abs(float(probe.w_D[2])) < 0.5 * min(float(probe.w_D[0]), -float(probe.w_D[1]))
    assert float(probe.w_D[3]) == 0.0, "a constant direction gets no weight"
    assert probe.retain_max_C.shape == (24,) and bool(torch.isfinite(probe.retain_max_C).all())
    # the calibration is each context's highest causal score from position GATE_MIN_TOKENS on
    x, m = retain[0][0][0], retain[0][1][0]
    s_T = (token_scores(x, probe.w_D) * m).cumsum(0) / m.float().cumsum(0).clamp_min(1) + probe.b
    assert float(max_score(x, m, probe.w_D, probe.b)) == pytest.approx(float(s_T[m.cumsum(0) >= 8].max()), abs=1e-5)

    # fresh contexts: the whole-context score separates the corpora, and the calibrated p100
    # threshold keeps the gate shut on most unseen retain contexts while unlearn ones pass it
    def score(ctxs):
        return torch.cat([(token_scores(x, probe.w_D) * m).sum(1) / m.sum(1) + probe.b for x, m in ctxs])
    r_new, u_new = score(_marked_contexts(24, 1, 5)), score(_marked_contexts(24, 0, 6))
    assert auroc(u_new, r_new) == 1.0
    thr = threshold_at(probe.retain_max_C.numpy(), 100)
    assert float((u_new > thr).float().mean()) > 0.9 and float((r_new > thr).float().mean()) < 0.1


def _xor_contexts(n: int, same: bool, seed: int):
    """Contexts whose tokens carry two random bits (dims 0, 1) that agree on 90% of the tokens
    (`same`) or disagree on 90%: each bit is 1 on half the tokens in both kinds, so no function
    of the running mean of the residual stream tells the kinds apart, only the tokens jointly."""
    g = torch.Generator().manual_seed(seed)
    T = 32
    a = (torch.rand(n, T, generator=g) < 0.5).float()
    agree = torch.rand(n, T, generator=g) < (0.9 if same else 0.1)
    x = torch.zeros(n, T, 4)
    x[..., 0], x[..., 1] = a, torch.where(agree, a, 1 - a)
    x[..., 2] = torch.randn(n, T, generator=g)
    m = torch.ones(n, T, dtype=torch.bool)
    m[:, 0] = False
    return [(x[i:i + 4], m[i:i + 4]) for i in range(0, n, 4)]


def test_mlp_probe_detects_a_topic_that_only_tokens_jointly_show():
    """The "mlp" detector scores each token with a small network and pools like the linear one:
    it separates corpora that differ only in how features co-occur within a token, which no
    linear probe of the running mean can; it is calibrated out of fold like the linear ones, and
    the stored detector is the two folds' networks side by side."""
    from trainer.gate.detector import _side_by_side, fit_probes, max_score, token_scores

    retain, unlearn = _xor_contexts(48, False, 0), _xor_contexts(48, True, 1)
    probes = fit_probes(lambda: iter(retain), unlearn, n_retain=48, n_unlearn=48, lengths=(8, 16), l2s=(0.01,),
                        mlp=True)
    assert set(probes) == {0.01, "mlp"}
    mlp, lin = probes["mlp"].detector, probes[0.01].detector
    assert mlp.kind == "mlp" and lin.kind == "linear" and mlp.W_HD.shape[1] == 4

    def whole(det, ctxs):  # each fresh context's score over all its tokens
        return torch.cat([(det.token_scores(x) * m).sum(1) / m.sum(1) + det.b for x, m in ctxs])

    r_new, u_new = _xor_contexts(24, False, 5), _xor_contexts(24, True, 6)
    assert auroc(whole(mlp, u_new), whole(mlp, r_new)) > 0.95
    assert auroc(whole(lin, u_new), whole(lin, r_new)) < 0.8, "the test needs a topic a linear probe cannot see"
    # calibration: every retain context's highest causal score from GATE_MIN_TOKENS on
    cal = probes["mlp"].retain_max_C
    assert cal.shape == (48,) and bool(torch.isfinite(cal).all())
    x, m = retain[0][0][0], retain[0][1][0]
    s_T = (mlp.token_scores(x[None])[0] * m).cumsum(0) / m.float().cumsum(0).clamp_min(1) + mlp.b
    assert float(max_score(x, m, mlp, mlp.b)) == pytest.approx(float(s_T[m.cumsum(0) >= 8].max()), abs=1e-5)
    assert torch.allclose(token_scores(x[None], mlp), mlp.token_scores(x[None]))
    # side by side: the mean of two networks' token scores
    h = int(mlp.W_HD.shape[0]) // 2
    a = type(mlp)(mlp.w[:h] * 2, 0.2, mlp.W_HD[:h], mlp.c_H[:h])
    b = type(mlp)(mlp.w[h:] * 2, -0.4, mlp.W_HD[h:], mlp.c_H[h:])
    both = _side_by_side(a, b)
    mean = (a.token_scores(x[None]) + b.token_scores(x[None])) / 2
    assert torch.allclose(both.token_scores(x[None]), mean, atol=1e-6)
    assert both.b == pytest.approx(-0.1)


def _assert_causal_and_cached(lm, iv: Intervention, ids: torch.Tensor) -> None:
    """With `iv` in the model: changing token t changes no output before t, and greedy generation
    with the KV cache gives the tokens of a full forward per step."""
    with torch.no_grad(), iv.hooked(lm.model):
        base = lm.model(ids).logits
        for t in (6, 12, 20):
            alt = ids.clone()
            alt[:, t] = (alt[:, t] + 7) % (lm.model.config.vocab_size - 4) + 4
            assert torch.equal(lm.model(alt).logits[:, :t], base[:, :t]), f"a change at {t} leaked backwards"
        cached = lm.model.generate(ids[:1, :10], max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
        seq = ids[:1, :10]
        for _ in range(8):
            seq = torch.cat([seq, lm.model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("probe_layer", [None, LAYER - 1, LAYER + 1])
def test_probe_gate_is_causal_and_kv_cached_generation_equals_recompute(lm, tmp_path, probe_layer):
    """The probe gate decides at t from tokens <= t only, also across KV-cached steps; also
    when the probe reads an earlier layer than the edited one (a later one is refused)."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40,
                            probe_layer=probe_layer))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, 24), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    setting = Setting(mode="clamp", multiplier=30.0, top_n=20, gate="probe", gate_threshold=0.0)
    if probe_layer is not None and probe_layer > LAYER:
        with pytest.raises(EvalError, match=f"reads layer {probe_layer}, after the edited layer {LAYER}"):
            Intervention(run, setting)
        return
    probe = Intervention(run, setting)
    assert probe.gate_layer == (LAYER if probe_layer is None else probe_layer)
    with torch.no_grad():  # put the threshold at the median running score, so the gate really decides
        hs = lm.model(ids, output_hidden_states=True).hidden_states
        h, gate_h = hs[LAYER + 1], hs[probe.gate_layer + 1]
        share, seen = firing_share(probe.signal(gate_h), ids != lm.model.config.bos_token_id)
    median = float(share[seen >= 8].median()) + float(run.gate["probe/b"][0])
    iv = Intervention(run, Setting(mode="clamp", multiplier=30.0, top_n=20, gate="probe", gate_threshold=median))
    _assert_causal_and_cached(lm, iv, ids)
    ed = iv.edit(h, ids != lm.model.config.bos_token_id, gate_h_BTD=gate_h)
    opened = ed.open_BT[seen >= 8]
    assert 0 < float(opened.float().mean()) < 1, "at the median the gate is open at some positions only"
    if probe_layer is not None:
        with pytest.raises(EvalError, match="pass its output"):
            iv.edit(h, ids != lm.model.config.bos_token_id)


def test_mlp_probe_gate_is_causal_and_kv_cached_generation_equals_recompute(lm, tmp_path):
    """A setting with the run's "mlp" detector gates on the running mean of its token scores,
    decides at t from tokens <= t only, and gives cached generation equal to full recompute."""

    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40,
                            mlp_probe=True))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, 24), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    setting = Setting(mode="clamp", multiplier=30.0, top_n=20, gate="probe", probe_kind="mlp", gate_threshold=0.0)
    det = run.gate.detector(kind="mlp")
    probe = Intervention(run, setting)
    with torch.no_grad():
        h = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        want = det.token_scores(h * run.scale)
        assert torch.allclose(probe.signal(h), want, atol=1e-5), "the gate pools the network's token scores"
        share, seen = firing_share(probe.signal(h), ids != lm.model.config.bos_token_id)
    median = float(share[seen >= 8].median()) + det.b
    iv = Intervention(run, setting.replace(gate_threshold=median))
    _assert_causal_and_cached(lm, iv, ids)
    opened = iv.edit(h, ids != lm.model.config.bos_token_id).open_BT[seen >= 8]
    assert 0 < float(opened.float().mean()) < 1, "at the median the gate is open at some positions only"
    plain = load_run(make_run(tmp_path / "plain", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40))
    with pytest.raises(EvalError, match="no 'mlp' probe detector"):
        Intervention(plain, setting)


def _probe_case(lm, tmp_path, T):
    """A run with a probe, 4 random rows of T tokens after BOS, a probe-gated clamp (threshold 0)
    and the clean residual at the edited layer."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40))
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, T), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    with torch.no_grad():
        h = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    setting = Setting(mode="clamp", multiplier=30.0, top_n=20, gate="probe", gate_threshold=0.0)
    return run, ids, ids != lm.model.config.bos_token_id, setting, h


def test_windowed_probe_gate_is_causal_and_follows_the_recent_tokens(lm, tmp_path):
    """A windowed gate decides at t from the last W tokens <= t; KV-cached generation carries
    the window (equal to full recompute); within the first W tokens it equals the unwindowed gate;
    the training calibration (of the mean from the start) is refused for it."""
    run, ids, editable, base, h = _probe_case(lm, tmp_path, 30)
    share, seen = firing_share(Intervention(run, base).signal(h), editable, window=6)
    median = float(share[seen >= 8].median()) + float(run.gate["probe/b"][0])
    iv = Intervention(run, base.replace(gate_threshold=median, gate_window=6))
    plain = Intervention(run, base.replace(gate_threshold=median))
    _assert_causal_and_cached(lm, iv, ids)
    win, full = iv.edit(h, editable).open_BT, plain.edit(h, editable).open_BT
    assert torch.equal(win[:, :7], full[:, :7]), "within the window's first tokens the two gates agree"
    assert not torch.equal(win, full), "past the window the gate follows the recent tokens"
    assert 0 < float(win[seen >= 8].float().mean()) < 1
    with pytest.raises(EvalError, match="window of 6 tokens"):
        Intervention(run, base.replace(gate_threshold=None, gate_window=6, gate_percentile=95.0))
    s = base.replace(gate_threshold=median, gate_window=6)
    assert Setting.from_dict(s.to_dict()) == s and "window 6" in s.label
    assert "gate_window" not in base.to_dict()
    assert s.changed(gate_window=None).gate_threshold == median, "a window keeps the threshold's units"


def test_probe_gate_signal_is_the_detectors_token_score_and_is_causal(lm, tmp_path):
    """The probe gate's per-token signal is the detector's token score x . w; its threshold on
    the running mean is the calibrated score less the bias; at the median it opens at some
    positions only; causal, and KV-cached generation equals recompute."""
    from trainer.gate.detector import token_scores

    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40))
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, 24), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    editable = ids != lm.model.config.bos_token_id
    probe = Setting(mode="clamp", multiplier=30.0, top_n=20, gate="probe", gate_threshold=0.0)
    with torch.no_grad():
        h = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
    iv = Intervention(run, probe)
    b = float(run.gate["probe/b"][0])
    assert iv.threshold == pytest.approx(-b)
    assert torch.equal(iv.signal(h), token_scores(h * run.scale, run.gate["probe/w"]))
    share, seen = firing_share(iv.signal(h), editable)
    median = float(share[seen >= 8].median())
    gated = Intervention(run, probe.replace(gate_threshold=median + b))
    _assert_causal_and_cached(lm, gated, ids)
    opened = gated.edit(h, editable).open_BT[seen >= 8]
    assert 0 < float(opened.float().mean()) < 1, "at the median the gate is open at some positions only"


@pytest.mark.parametrize("mode", ["project", "retain_mean", "clamp"])
def test_every_edit_form_behind_a_windowed_network_gate_is_causal_and_cache_exact(lm, tmp_path, mode):
    """The demo's gate (the "mlp" detector's scores averaged over the last W tokens) with each
    edit form: a later token never changes an earlier output, KV-cached generation equals full
    recompute, and the edit acts only where the gate is open."""
    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40,
                            mlp_probe=True))
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(4, lm.model.config.vocab_size, (4, 30), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    editable = ids != lm.model.config.bos_token_id
    base = Setting(mode=mode, multiplier=30.0, top_n=20, gate="probe", probe_kind="mlp", gate_threshold=0.0,
                   gate_window=6)
    with torch.no_grad():
        h = lm.model(ids, output_hidden_states=True).hidden_states[LAYER + 1]
        share, seen = firing_share(Intervention(run, base).signal(h), editable, window=6)

    median = float(share[seen >= 8].median()) + run.gate.detector(kind="mlp").b
    iv = Intervention(run, base.replace(gate_threshold=median))
    _assert_causal_and_cached(lm, iv, ids)
    ed = iv.edit(h, editable)
    assert 0 < float(ed.open_BT[seen >= 8].float().mean()) < 1
    shut_BT = ~ed.open_BT
    assert torch.equal(ed.h_BTD[shut_BT], h[shut_BT]), "a position where the gate is shut is left bit-identical"
    assert not torch.equal(ed.h_BTD, h)
