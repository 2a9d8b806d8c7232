"""Training from a real (tiny) Zarr activation store built with cache.store: masks, split,
scale, user errors, run folder metadata, resume through `train()`."""

import json

import numpy as np
import pytest
import torch
from conftest import CTX, D, make_store
from safetensors.torch import load_file

from cache.store import from_storage
from trainer.config import TrainConfig
from trainer.data import TokenStream, open_training_data
from trainer.errors import TrainError
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def test_streams_hold_only_masked_tokens_of_the_train_split(tmp_path):
    data = open_training_data(str(make_store(tmp_path / "s.zarr")), 1, 0.2)
    # retain: 10 chunks of 4 contexts -> the last 2 chunks held out
    assert [p.chunk for p in data.retain.held_out.pieces] == [8, 9]
    single = open_training_data(str(make_store(tmp_path / "one.zarr", layers=(3,))), None, 0.2)
    assert single.meta["layer"] == 3
    assert data.meta["retain_contexts"] == [32, 8] and data.meta["model_hash"] == "h1"
    n_train = 32 * (CTX - 1)  # no padding in the train split
    stream = TokenStream(data.retain.train, batch_size=n_train // 4, buffer_chunks=3, seed=0)
    x = torch.cat([next(stream) for _ in range(4)])
    stream.close()
    assert len(x) == n_train and x.abs().max() < 100
    held = torch.cat([torch.from_numpy(data.retain.held_out.read(k)) for k in range(2)])
    assert len(held) == 8 * (CTX - 1) - 2 and held.abs().max() < 100  # padding removed


def test_bfloat16_store_streams_the_stored_values_scaled(tmp_path):
    """Buffers keep bf16 bit patterns and convert per batch: every train token comes out once
    per epoch, equal to the stored value (as float32) times the scale."""
    data = open_training_data(str(make_store(tmp_path / "s.zarr", dtype="bfloat16")), 1, 0.2)
    src = data.retain.train
    want = np.concatenate([from_storage(*src.read_stored(k)) for k in range(len(src))]) * np.float32(0.5)
    assert src.read_stored(0)[0].dtype == np.uint16 and src.read_stored(0)[1] == "bfloat16"
    assert len(want) % 4 == 0  # one buffer of the whole split, four whole batches
    stream = TokenStream(src, batch_size=len(want) // 4, buffer_chunks=len(src), seed=0, scale=0.5)
    got = torch.cat([next(stream) for _ in range(4)]).numpy()
    stream.close()
    assert got.dtype == np.float32 and not np.array_equal(got, want)  # shuffled
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731 (rows sorted, for a multiset compare)
    np.testing.assert_array_equal(order(got), order(want))


def test_user_errors_are_one_line_train_errors(tmp_path):
    good = str(make_store(tmp_path / "good.zarr"))
    incomplete = str(make_store(tmp_path / "inc.zarr", complete=False))
    other_model = str(make_store(tmp_path / "o.zarr", model_hash="h2"))
    other_width = str(make_store(tmp_path / "d.zarr", d_model=4))
    cases = [
        ((incomplete, 1), {}, "incomplete"),
        ((good, 5), {}, "layer 5 is not in"),
        ((good, None), {}, "holds layers 1, 2; choose one"),
        ((str(tmp_path), 1), {}, "not an activation store"),
        ((good, 1), {"unlearn_store": other_model}, "differ in model_hash"),
        ((good, 1), {"unlearn_store": other_width}, "differ in"),
    ]
    for args, kw, match in cases:
        with pytest.raises(TrainError, match=match) as e:
            open_training_data(*args, 0.2, **kw)
        assert "\n" not in str(e.value)


CFG = TrainConfig(expansion=2, n_clusters=3, steps=16, warmup=2, batch_contexts=4, lr=3e-3,
                  recluster_every=4, importance_batches=2, log_every=2, checkpoint_every=3,
                  buffer_chunks=2, eval_frac=0.2, scale_chunks=4)


@pytest.mark.parametrize("method", ["featureforget", "baseline"])
def test_train_from_store_writes_run_folder(tmp_path, method):
    store = str(make_store(tmp_path / "s.zarr"))
    summary = train(CFG.replace(method=method), store, 2, str(tmp_path / "run"), progress=False)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    for key in ("model", "model_hash", "layer", "d_model", "scale", "method", "ctx_len", "d_sae"):
        assert key in config, key
    assert config["layer"] == 2 and config["method"] == method and config["d_sae"] == 2 * D
    assert config["scale"] == pytest.approx(1.0, rel=0.15)  # unit normal retain data: E||x||^2 = d
    assert summary.eval["retain"]["tokens"] == 8 * (CTX - 1) - 2
    assert summary.eval["unlearn"]["tokens"] == 4 * (CTX - 1) - 2  # 6 chunks -> 1 held out
    assert set(load_file(str(tmp_path / "run" / "features.safetensors"))) >= {
        "alpha_r", "alpha_u", "freq_r", "freq_u", "cluster", "candidate"}
    gate = load_file(str(tmp_path / "run" / "gate.safetensors"))  # the probe gate reads the residual stream
    assert gate["probe/w"].shape == (D,) and gate["probe/b"].shape == (1,)
    assert len(gate["probe/max"]) == config["retain_contexts"][0] and bool(torch.isfinite(gate["probe/max"]).all())
    assert not any(k.endswith("/max_pos") for k in gate), "one calibration per detector"
    from trainer.gate.detector import PROBE_L2S
    from trainer.gate.store import GateFile, probe_prefix
    assert GateFile(gate).l2s() == [None, *PROBE_L2S[1:]], "one detector per L2 penalty, the default first"
    ws = [gate[f"{probe_prefix(l2)}/w"] for l2 in PROBE_L2S]
    assert all(w.shape == (D,) for w in ws) and not torch.equal(ws[0], ws[-1])
    assert ws[-1].norm() > ws[0].norm(), "a weaker penalty leaves larger weights"
    from trainer.gate.detector import PROBE_MLP_HIDDEN
    assert GateFile(gate).detectors()[-1] == ("mlp", None), "and one 'mlp' detector"
    mlp = GateFile(gate).detector(kind="mlp")
    assert mlp.W_HD.shape == (2 * PROBE_MLP_HIDDEN, D) and mlp.w.shape == mlp.c_H.shape == (2 * PROBE_MLP_HIDDEN,)
    assert gate["probe@mlp/max"].shape == gate["probe/max"].shape and bool(torch.isfinite(gate["probe@mlp/max"]).all())


def test_cli_train_options_reach_the_run_config(tmp_path):
    from click.testing import CliRunner

    from cli import main

    store = str(make_store(tmp_path / "s.zarr"))
    args = ["train", "--store", store, "--layer", "2", "--out", str(tmp_path / "run"), "--set", "steps=8",
            "--set", "expansion=2", "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=2",
            "--set", "recluster_every=2", "--set", "candidate_max_freq_r=1", "--set", "gate_lr=0.1", "--quiet"]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["candidate_max_freq_r"] == 1.0 and config["gate_lr"] == 0.1 and config["steps"] == 8
    r = CliRunner().invoke(main, args[:-3] + ["--set", "candidate_max_freq_r=2", "--overwrite"])
    assert r.exit_code == 2 and "error: candidate_max_freq_r must be in [0, 1], got 2.0" in r.output


def test_resume_through_train_matches_uninterrupted(tmp_path):
    store = str(make_store(tmp_path / "s.zarr"))
    train(CFG, store, 1, str(tmp_path / "a"), progress=False)

    def kill(step):
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CFG, store, 1, str(tmp_path / "b"), progress=False, on_step=kill)
    with pytest.raises(TrainError, match="exists"):
        train(CFG, store, 1, str(tmp_path / "b"), progress=False)
    with pytest.raises(TrainError, match="layer"):
        train(None, store, 2, str(tmp_path / "b"), resume=True, progress=False)
    train(None, store, 1, str(tmp_path / "b"), resume=True, progress=False)
    a, b = (load_file(str(tmp_path / r / "sae.safetensors")) for r in "ab")
    assert all(torch.equal(a[k], b[k]) for k in a)
    metrics = [(tmp_path / r / "metrics.jsonl").read_text() for r in "ab"]
    assert metrics[0] == metrics[1]


def test_runs_on_the_same_store_and_layer_share_one_detector_fit(tmp_path, monkeypatch):
    """The detectors depend on the store, layer, split and scale, not on the SAE: a second run of
    the process with the same ones (another method or seed) reuses the first fit, bit for bit,
    and a run on another layer fits its own."""
    import trainer.finish as finish

    calls = []
    fit = finish.fit_probes
    monkeypatch.setattr(finish, "fit_probes", lambda *a, **k: calls.append(1) or fit(*a, **k))
    store = str(make_store(tmp_path / "s.zarr"))
    cfg = CFG.replace(steps=4)
    train(cfg, store, 2, str(tmp_path / "ff"), progress=False)
    train(cfg.replace(method="baseline", seed=1), store, 2, str(tmp_path / "base"), progress=False)
    assert len(calls) == 1, "the second run reuses the first run's detectors"
    a, b = (load_file(str(tmp_path / r / "gate.safetensors")) for r in ("ff", "base"))
    for key in [k for k in a if k.startswith("probe")]:
        assert torch.equal(a[key], b[key]), key
    train(cfg, store, 1, str(tmp_path / "l1"), progress=False)
    assert len(calls) == 2, "another layer: its own fit"


def test_probe_offset_fits_the_probe_on_an_earlier_layer_of_the_store(tmp_path):
    """`probe_offset` 1 at layer 2: the probe is the one a run at layer 1 fits (same contexts,
    that layer's own scale), and the run records which layer it reads."""
    store = str(make_store(tmp_path / "s.zarr"))
    cfg = CFG.replace(steps=4, method="baseline")
    train(cfg.replace(probe_offset=1), store, 2, str(tmp_path / "l2"), progress=False)
    train(cfg, store, 1, str(tmp_path / "l1"), progress=False)
    train(cfg, store, 2, str(tmp_path / "l2same"), progress=False)
    cross, own1, own2 = (load_file(str(tmp_path / r / "gate.safetensors")) for r in ("l2", "l1", "l2same"))
    assert int(cross["probe/layer"][0]) == 1 and "probe/layer" not in own1
    scale = json.loads((tmp_path / "l1" / "config.json").read_text())["scale"]
    assert float(cross["probe/scale"][0]) == pytest.approx(scale)
    for key in ("probe/w", "probe/b", "probe/max", "probe@0.01/w"):
        torch.testing.assert_close(cross[key], own1[key])
    assert not torch.allclose(cross["probe/w"], own2["probe/w"]), "layer 2's own probe differs"
    with pytest.raises(TrainError, match="points before layer 0"):
        train(cfg.replace(probe_offset=3), store, 2, str(tmp_path / "bad"), progress=False)
    with pytest.raises(TrainError, match=r"the probe reads layer 0 \(probe_offset=2\): .*layer 0 is not in"):
        train(cfg.replace(probe_offset=2), store, 2, str(tmp_path / "bad2"), progress=False)
    assert not (tmp_path / "bad").exists() and not (tmp_path / "bad2").exists(), "refused before any write"
    with pytest.raises(TrainError, match="probe_offset must be >= 0"):
        cfg.replace(probe_offset=-1)
