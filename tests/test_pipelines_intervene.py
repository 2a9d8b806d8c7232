"""METHOD §7 intervention on the tiny model: exact edits, untouched features, clamp, hook cleanup."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from test_pipelines_helpers import make_run, set_encoder_bias, single_thread  # noqa: F401 (autouse fixture)

from cache.capture import capture_layers
from cache.models import load_model
from pipelines.config import EvalConfig, Setting, SweepGrid
from pipelines.errors import EvalError
from pipelines.intervene import Intervention, load_run, select_features, unlearned

LAYER = 1


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, device="cpu")


@pytest.fixture()
def run_dir(lm, tmp_path):
    return make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash)


def _ids(lm, n_rows=3, T=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, lm.model.config.vocab_size, (n_rows, T), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    return ids


@torch.no_grad()
def _resid(lm, ids, iv=None):
    """Block-LAYER output as seen by a hook registered after the intervention's."""
    def go():
        with capture_layers(lm.model, [LAYER], stop=False) as acts:
            lm.model.model(input_ids=ids)
        return acts[LAYER]
    if iv is None:
        return go()
    with iv.hooked(lm.model):
        return go()


def _selected_acts(run, S, h):
    sae, s = run.sae, run.scale
    with torch.no_grad():
        f = torch.relu((h * s - sae.b_dec) @ sae.W_enc[:, S] + sae.b_enc[S])
    f[:, 0] = 0  # BOS is never edited
    return f


def test_ablate_removes_exactly_the_selected_contributions(lm, run_dir):
    run = load_run(run_dir)
    iv = Intervention(run, Setting(gate="none", mode="ablate"))
    ids = _ids(lm)
    h, h_new = _resid(lm, ids), _resid(lm, ids, iv)
    f = _selected_acts(run, iv.features, h)
    assert (f > 0).sum() > 5, "the test needs active selected features"
    expected = h - (f @ run.sae.W_dec[iv.features].detach()) / run.scale
    torch.testing.assert_close(h_new, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(h_new[:, 0], h[:, 0]), "BOS must pass unchanged"
    assert not torch.allclose(h_new, h)
    # what was removed lies in the span of the selected decoder rows: nothing else is touched
    delta = (h - h_new).reshape(-1, h.shape[-1]).T
    W = run.sae.W_dec[iv.features].detach().T
    coef = torch.linalg.lstsq(W, delta).solution
    torch.testing.assert_close(W @ coef, delta, atol=1e-4, rtol=1e-4)


def test_inactive_selected_features_leave_h_and_logits_bit_identical(lm, run_dir):
    S = select_features(load_run(run_dir), Setting(gate="none", mode="ablate", top_n=5))
    set_encoder_bias(run_dir, {int(i): -1e4 for i in S})
    run = load_run(run_dir)
    ids = _ids(lm)
    for setting in (Setting(gate="none", mode="ablate", top_n=5),
                    Setting(gate="none", mode="clamp", multiplier=200, top_n=5)):
        iv = Intervention(run, setting)
        assert torch.equal(_resid(lm, ids, iv), _resid(lm, ids))
        edited = iv.edit(_resid(lm, ids))
        assert not edited.changed_B.any()
        with torch.no_grad(), iv.hooked(lm.model):
            hooked = lm.model(ids).logits
        assert torch.equal(hooked, lm.model(ids).logits)


def test_clamp_sets_selected_active_features_to_minus_m(lm, run_dir):
    run = load_run(run_dir)
    m = 7.0
    iv = Intervention(run, Setting(gate="none", mode="clamp", multiplier=m, top_n=8))
    ids = _ids(lm, seed=1)
    h, h_new = _resid(lm, ids), _resid(lm, ids, iv)
    sae, s, S = run.sae, run.scale, iv.features
    with torch.no_grad():
        x = h * s
        f = sae.encode(x)
        f_clamped = f.clone()
        sel = f[..., S]
        sel[:, 0] = 0  # BOS untouched
        t = m * run.features["act_u"][S]  # m in units of each feature's mean firing value
        f_clamped[..., S] = torch.where(sel > 0, -t.expand_as(sel), f[..., S])
        # re-encode: the edited h has the SAE decomposition decode(f') + the same error term
        error = x - sae.decode(f)
        expected = (sae.decode(f_clamped) + error) / s
    assert (sel > 0).any()
    torch.testing.assert_close(h_new, expected, atol=1e-4, rtol=1e-5)
    # re-encode by solving for the selected coefficients of the edited h (W_dec[S] has full row
    # rank): they are -m where the feature was active and 0 elsewhere
    keep = torch.ones(sae.d_sae, dtype=torch.bool)
    keep[S] = False
    with torch.no_grad():
        rest = h_new * s - error - sae.b_dec - f[..., keep] @ sae.W_dec[keep]
        coef = torch.linalg.lstsq(sae.W_dec[S].T, rest.reshape(-1, h.shape[-1]).T).solution.T
    torch.testing.assert_close(coef, f_clamped[..., S].reshape(-1, len(S)), atol=1e-3, rtol=1e-3)


def test_context_manager_removes_its_hooks(lm, run_dir):
    ids = _ids(lm)
    block = lm.model.model.layers[LAYER]
    n_hooks, n_pre = len(block._forward_hooks), len(lm.model.model._forward_pre_hooks)
    with torch.no_grad():
        clean = lm.model(ids).logits
        with unlearned(lm.model, run_dir, mode="clamp", multiplier=50) as iv:
            assert iv.n_features == 12
            edited = lm.model(ids).logits
        after = lm.model(ids).logits
        with pytest.raises(RuntimeError):
            with unlearned(lm.model, run_dir, mode="ablate"):
                raise RuntimeError("boom")
        after_error = lm.model(ids).logits
    assert not torch.allclose(edited, clean)
    assert torch.equal(after, clean) and torch.equal(after_error, clean)
    assert len(block._forward_hooks) == n_hooks and len(lm.model.model._forward_pre_hooks) == n_pre


def test_splice_and_zero_modes(lm, run_dir):
    run = load_run(run_dir)
    ids = _ids(lm)
    h = _resid(lm, ids)
    zero = _resid(lm, ids, Intervention(run, Setting(gate="none", mode="zero")))
    assert torch.equal(zero[:, 1:], torch.zeros_like(zero[:, 1:])) and torch.equal(zero[:, 0], h[:, 0])
    splice = _resid(lm, ids, Intervention(run, Setting(gate="none", mode="splice")))
    with torch.no_grad():
        expected = run.sae(h * run.scale).x_hat / run.scale
    torch.testing.assert_close(splice[:, 1:], expected[:, 1:], atol=1e-5, rtol=1e-5)


def test_feature_selection_candidates_and_saebench():
    F = 8
    feats = {"candidate": torch.tensor([1, 1, 1, 0, 0, 1, 0, 0], dtype=torch.bool),
             "alpha_u": torch.tensor([1.0, 4.0, 2.0, 9.0, 9.0, 3.0, 0.0, 0.0]),
             "alpha_r": torch.tensor([1.0, 1.0, 0.5, 0.1, 0.1, 3.0, 1.0, 1.0]),
             "freq_r": torch.tensor([0.0, 0.0005, 0.005, 0.02, 0.0001, 0.0, 0.0, 0.0009]),
             "freq_u": torch.tensor([0.3, 0.2, 0.5, 0.9, 0.1, 0.0, 0.05, 0.4])}
    run = SimpleNamespace(features=feats, method="featureforget")
    assert select_features(run, Setting(top_n=None)).tolist() == [0, 1, 2, 5]
    assert select_features(run, Setting(top_n=2)).tolist() == [1, 2]  # ratios 4 and 4 > 1 > 1
    sb = Setting(selection="saebench", freq_threshold=0.001, top_n=2)
    assert select_features(run, sb).tolist() == [0, 7]  # freq_r < 0.001, by freq_u: 7 (0.4), 0 (0.3)
    sb = Setting(selection="saebench", freq_threshold=0.01, top_n=2)
    assert select_features(run, sb).tolist() == [2, 7]  # 2 (0.5) now passes the threshold
    assert len(select_features(run, Setting(selection="saebench", top_n=20))) == 6  # never-firing excluded
    assert F == len(feats["candidate"])


def test_grid_settings_and_validation():
    g = SweepGrid()
    ff, base = g.settings("featureforget"), g.settings("baseline")
    # 4 clamp strengths x 3 counts x (candidates, saebench, ratio) x (static, sequence gate, probe
    # gate at 2 percentiles); baseline: no candidates
    assert len(ff) == 144 and len(base) == 96
    assert {s.selection for s in base} == {"saebench", "ratio"}
    assert {s.gate for s in ff} == {"none", "sequence", "probe"} and {s.top_n for s in ff} == {10, 20, 50}
    assert {s.gate_percentile for s in ff if s.gate == "probe"} == {99.0, 100.0}
    assert Setting.from_dict(ff[3].to_dict()) == ff[3]
    assert Setting.from_dict(ff[-1].to_dict()) == ff[-1]
    calibrated = ff[-1].replace(gate_threshold=-1.25)
    assert Setting.from_dict(calibrated.to_dict()) == calibrated and "threshold -1.25" in calibrated.label
    assert "gate_threshold" not in ff[-1].to_dict()
    # stronger clamps behind the probe gate only
    strong = SweepGrid(multipliers=(10.0,), probe_multipliers=(10.0, 1000.0), top_n=(50,), selections=("saebench",))
    got = {(s.gate, s.multiplier) for s in strong.settings("baseline")}
    assert got == {("none", 10.0), ("sequence", 10.0), ("probe", 10.0), ("probe", 1000.0)}
    assert len(strong.settings("baseline")) == 1 + 1 + 2 * 2  # probe: 2 strengths x 2 percentiles
    assert SweepGrid.from_dict(strong.to_dict()) == strong
    chosen = ff[-1].replace(probe_l2=0.01)
    assert "l2=0.01" in chosen.label and Setting.from_dict(chosen.to_dict()) == chosen
    assert "probe_l2" not in ff[-1].to_dict() and "probe_l2" not in ff[0].replace(probe_l2=0.01).to_dict()
    mlp = ff[-1].replace(probe_kind="mlp")
    assert " probe mlp p" in mlp.label and Setting.from_dict(mlp.to_dict()) == mlp
    assert "probe_kind" not in ff[-1].to_dict(), "the default detector kind is not written"
    with pytest.raises(EvalError, match="unknown probe detector kind 'tree'"):
        Setting(gate="probe", probe_kind="tree")
    with pytest.raises(EvalError, match="the 'mlp' detector has none"):
        Setting(gate="probe", probe_kind="mlp", probe_l2=0.01)
    with pytest.raises(EvalError, match="mode"):
        Setting(gate="none", mode="erase")
    with pytest.raises(EvalError, match="multiplier"):
        Setting(gate="none", mode="clamp", multiplier=0)
    with pytest.raises(EvalError, match="gate"):
        Setting(gate="sometimes")
    # settings of earlier versions that name the graded gate or the positive pooling are refused;
    # their defaults (what they meant when absent) load as before
    for retired in ({"ramp_percentile": 97.0, "ramp_threshold": 0.5}, {"probe_pool": "positive"}):
        with pytest.raises(EvalError, match=r"^the setting uses .*which ff no longer has.*run ff eval"):
            Setting.from_dict({"gate": "probe", **retired})
    old = {"gate": "probe", "gate_threshold": 1.5, "probe_pool": "mean", "ramp_percentile": None}
    assert Setting.from_dict(old) == Setting(gate="probe", gate_threshold=1.5)
    assert SweepGrid.from_dict({"top_n": [50], "probe_pools": ["mean", "positive"]}) == SweepGrid(top_n=(50,))
    from pipelines.config import PROBE_KINDS
    from trainer.gate.detector import PROBE_KINDS as TRAINED_KINDS
    assert PROBE_KINDS == TRAINED_KINDS, "every detector kind a setting may name is one ff train fits"


def test_probe_threshold_comes_from_the_training_calibration(tmp_path):
    """Without an explicit threshold the probe gate takes its percentile from the retain training
    calibration (probe/max) less the probe's bias; a run without that calibration is refused
    with a way out; an explicit threshold is used as is."""
    from safetensors.torch import load_file, save_file

    from pipelines.intervene import make_gate
    from trainer.gate.calibrate import threshold_at

    path = make_run(tmp_path / "run", 64, 3, "h")
    run = load_run(path)
    feats = torch.arange(3)
    mean = Setting(gate="probe", gate_percentile=90.0)
    b = float(run.gate["probe/b"][0])
    assert make_gate(run, mean, feats).threshold == pytest.approx(threshold_at(run.gate["probe/max"].numpy(), 90.0) - b)
    assert make_gate(run, mean.replace(gate_threshold=0.25), feats).threshold == pytest.approx(0.25 - b)
    gate = load_file(str(path / "gate.safetensors"))
    del gate["probe/max"]
    save_file(gate, str(path / "gate.safetensors"))
    with pytest.raises(EvalError, match="no training calibration of its probe gate"):
        make_gate(load_run(path), mean, feats).threshold
    assert make_gate(load_run(path), mean.replace(gate_threshold=0.25), feats).threshold == pytest.approx(0.25 - b)


def test_unlearned_defaults_to_the_runs_chosen_setting(lm, run_dir):
    """Without a setting, the Python API applies the setting `ff run` / `ff eval` chose for the run
    (RUN/unlearning.json), exactly as Intervention(run, that setting) does; keywords change fields."""
    import json

    ids = _ids(lm)
    with torch.no_grad(), unlearned(lm.model, run_dir) as iv:  # no unlearning.json: the method's default
        assert iv.setting.gate == "sequence" and iv.setting.top_n == 20
    chosen = Setting(gate="none", mode="clamp", multiplier=30.0, top_n=5)
    (run_dir / "unlearning.json").write_text(json.dumps({"best": {"setting": chosen.to_dict()}}))
    with torch.no_grad():
        want = _resid(lm, ids, Intervention(load_run(run_dir), chosen))
        with unlearned(lm.model, run_dir) as iv:
            assert iv.setting == chosen and iv.n_features == 5
            got = _resid(lm, ids)
        with unlearned(lm.model, run_dir, multiplier=3.0) as iv:
            assert iv.setting == chosen.replace(multiplier=3.0)
            weaker = _resid(lm, ids)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(weaker, want)
    with pytest.raises(EvalError, match="unknown setting field"):
        with unlearned(lm.model, run_dir, strength=3.0):
            pass
    # an evaluation that found no retain-safe setting: the default, said out loud
    (run_dir / "unlearning.json").write_text(json.dumps({"best": None, "best_reason": "no retain-safe setting: ..."}))
    with pytest.warns(UserWarning, match="no chosen setting .no retain-safe setting"):
        with unlearned(lm.model, run_dir) as iv:
            assert iv.setting.gate == "sequence" and iv.setting.top_n == 20


def test_changing_the_gate_drops_a_threshold_calibrated_for_another():
    probe = Setting(gate="probe", gate_percentile=99.0, gate_threshold=1.2, probe_l2=0.01)
    assert probe.changed(multiplier=50.0).gate_threshold == 1.2  # the gate is the same
    assert probe.changed(gate="sequence").gate_threshold is None
    assert probe.changed(gate_percentile=95.0).gate_threshold is None
    assert probe.changed(probe_l2=0.1).gate_threshold is None
    assert probe.changed(probe_l2=None, probe_kind="mlp").gate_threshold is None  # another detector
    assert probe.changed(gate_percentile=95.0, gate_threshold=0.5).gate_threshold == 0.5  # set explicitly


def test_missing_run_files_and_wrong_model_are_one_line_errors(lm, run_dir, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalError, match="no config.json"):
        load_run(tmp_path / "empty")
    other = make_run(tmp_path / "wide", 48, LAYER, "x")
    with pytest.raises(EvalError, match="d_model 48 but the model has hidden size 32"):
        with unlearned(lm.model, other):
            pass


@pytest.mark.parametrize("method", ["featureforget", "baseline"])
def test_every_preset_grid_setting_has_its_sequence_gate_calibrated_by_train(tmp_path, method):
    """`ff train` calibrates the sequence gate of every selection the preset sweeps ask for, so
    `ff run --preset demo` never stops at a gate it has no threshold for."""
    from pipelines.config import PRESETS
    from trainer.gate.calibrate import calibration_sets

    run = load_run(make_run(tmp_path / "run", 16, 1, "sha256:x", d_sae=300, method=method, n_candidates=250))
    calibrated = set(calibration_sets(run.features, method))
    for preset in PRESETS:
        grid = EvalConfig.preset(preset).grid
        for s in grid.settings(method):
            if s.gate == "sequence":
                assert s.set_key in calibrated, (preset, s.label)


def test_project_removes_the_span_of_the_selected_directions(lm, run_dir):
    run = load_run(run_dir)
    iv = Intervention(run, Setting(gate="none", mode="project", top_n=5))
    ids = _ids(lm)
    h, h_new = _resid(lm, ids), _resid(lm, ids, iv)
    W = run.sae.W_dec[iv.features].detach()  # [S, D]
    x_new = h_new[:, 1:] * run.scale - run.sae.b_dec.detach()
    # after the edit, x - b_dec has no component along any selected decoder direction
    torch.testing.assert_close(x_new @ W.T, torch.zeros(*x_new.shape[:2], len(W)), atol=1e-4, rtol=0)
    # and the removed part lies in their span (nothing else is touched)
    delta = (h - h_new)[:, 1:].reshape(-1, h.shape[-1]).T
    coef = torch.linalg.lstsq(W.T, delta).solution
    torch.testing.assert_close(W.T @ coef, delta, atol=1e-4, rtol=1e-4)
    assert torch.equal(h_new[:, 0], h[:, 0]), "BOS must pass unchanged"


def test_retain_mean_sets_the_selected_features_to_their_retain_mean(lm, run_dir):
    run = load_run(run_dir)
    iv = Intervention(run, Setting(gate="none", mode="retain_mean", top_n=5))
    ids = _ids(lm)
    h, h_new = _resid(lm, ids), _resid(lm, ids, iv)
    f = _selected_acts(run, iv.features, h)
    mean_S = run.features["mean_r"][iv.features]
    assert not torch.equal(mean_S, torch.zeros_like(mean_S)), "the test needs non-zero retain means"
    expected = h - ((f - mean_S) @ run.sae.W_dec[iv.features].detach()) / run.scale
    expected[:, 0] = h[:, 0]
    torch.testing.assert_close(h_new, expected, atol=1e-5, rtol=1e-5)


def test_settings_installed_on_their_own_rows_act_as_each_installed_alone(lm, tmp_path):
    """intervene.attach_rows: a probe-gated clamp reading an earlier block, a sequence-gated clamp
    and a static clamp, each on its own rows of one batch, give each row the logits and the
    KV-cached greedy continuation that the setting installed alone gives it."""
    from pipelines.fluency import greedy
    from pipelines.intervene import hooked_rows

    run = load_run(make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, probe_layer=LAYER - 1))
    ivs = [Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0)),
           Intervention(run, Setting(gate="sequence", mode="clamp", multiplier=5.0, gate_window=4, gate_threshold=0.5)),
           Intervention(run, Setting(gate="none", mode="clamp", multiplier=5.0))]
    ids = _ids(lm, n_rows=6, T=10, seed=3)
    parts = [(iv, slice(2 * k, 2 * k + 2)) for k, iv in enumerate(ivs)]
    with torch.no_grad():
        clean = lm.model(ids).logits
        with hooked_rows(lm.model, parts):
            together = lm.model(ids).logits
            cont = greedy(lm.model, ids, 6, batch=len(ids))
    for iv, rows in parts:
        with torch.no_grad(), iv.hooked(lm.model):
            alone = lm.model(ids[rows]).logits
        torch.testing.assert_close(together[rows], alone, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(alone, clean[rows]), "each setting changes its rows"
        with iv.hooked(lm.model):
            assert torch.equal(cont[rows], greedy(lm.model, ids[rows], 6, batch=2))
    with pytest.raises(EvalError, match="6 rows but the settings installed on it cover 4"), torch.no_grad(), \
            hooked_rows(lm.model, parts[:2]):
        lm.model(ids)
    other = load_run(make_run(tmp_path / "other", lm.info.d_model, LAYER + 1, lm.info.weights_hash))
    with pytest.raises(EvalError, match="one layer"), \
            hooked_rows(lm.model, [parts[0], (Intervention(other, Setting(gate="none")), slice(2, 6))]):
        pass
