"""The training loop on in-memory data (the dictionary_learning seam): end to end, run folder,
resume determinism, user errors."""

import json

import pytest
import torch
from safetensors.torch import load_file

from trainer.config import TrainConfig
from trainer.data import ArraySource, TokenStream
from trainer.errors import NonFiniteLossError, TrainError
from trainer.sae import SAE
from trainer.train import HeldOut, train_on_streams

D = 12


pytestmark = pytest.mark.usefixtures("one_thread")


def toy_data(n: int = 6000, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse sums of unit directions: retain uses 0..23, unlearn 12..35 (12 of its own)."""
    g = torch.Generator().manual_seed(seed)
    dirs = torch.randn(36, D, generator=g)
    dirs /= dirs.norm(dim=1, keepdim=True)

    def make(lo, hi):
        on = (torch.rand(n, hi - lo, generator=g) < 0.1).float()
        return (on * (1 + torch.rand(n, hi - lo, generator=g))) @ dirs[lo:hi]

    return make(0, 24), make(12, 36)


# candidate_max_freq_r: the toy SAE is dense after 40 steps (freq_r 0.3-0.7); 0.4 binds and
# still leaves candidates.
CFG = TrainConfig(expansion=4, n_clusters=4, steps=40, warmup=5, batch_contexts=4, lr=3e-3, l1=0.05,
                  recluster_every=5, importance_batches=2, importance_decay=0.9, log_every=3,
                  checkpoint_every=4, eval_max_tokens=1000, candidate_max_freq_r=0.4)


def streams(x_r, x_u, B=64):
    return tuple(TokenStream(ArraySource(x[:5000], 500), batch_size=B, buffer_chunks=2, seed=0,
                             stream_id=i) for i, x in enumerate((x_r, x_u)))


def held_out(x_r, x_u):
    return HeldOut(lambda: x_r[5000:].split(256), lambda: x_u[5000:].split(256))


class Killed(Exception):
    pass


def run(out, cfg=CFG, *, kill_at=None, resume=False, overwrite=False, data=None):
    x_r, x_u = data if data is not None else toy_data()
    r, u = streams(x_r, x_u)

    def on_step(step):
        if step == kill_at:
            raise Killed

    try:
        return train_on_streams(cfg, r, u, d_model=D, out=out, held_out=held_out(x_r, x_u),
                                resume=resume, overwrite=overwrite, on_step=on_step)
    except Killed:
        return None
    finally:
        r.close(), u.close()


def test_end_to_end_featureforget_run_folder(tmp_path):
    out = tmp_path / "run"
    summary = run(out)
    assert summary.method == "featureforget" and summary.d_sae == 4 * D
    for name in ("config.json", "sae.safetensors", "features.safetensors", "clusters.json",
                 "metrics.jsonl", "eval.json", "checkpoints/last.pt"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["method"] == "featureforget" and config["d_model"] == D and config["scale"] == 1.0
    assert TrainConfig.from_dict(config) == CFG  # extra keys tolerated
    sae, scale, _ = SAE.from_run(out)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(4 * D))
    feats = load_file(str(out / "features.safetensors"))
    assert feats["cluster"].dtype == torch.int64 and feats["candidate"].dtype == torch.bool
    assert set(feats["cluster"].tolist()) <= set(range(4))
    clusters = json.loads((out / "clusters.json").read_text())
    assert len(clusters["tau"]) == len(clusters["gate_r"]) == len(clusters["gate_u"]) == 4
    # candidates are exactly what §4 says for the saved training statistics (the running means);
    # alpha_*/freq_* without the prefix are the final pass over every training token
    tau_F = torch.tensor(clusters["tau"])[feats["cluster"]]
    expected = ((feats["train_alpha_u"] > tau_F) & (feats["train_alpha_r"] <= tau_F)
                & (feats["train_freq_r"] < CFG.candidate_max_freq_r))
    assert torch.equal(feats["candidate"], expected) and expected.any()
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert [ln["step"] for ln in lines] == list(range(3, 40, 3)) + [40]
    assert lines[0]["phase"] == 1 and lines[-1]["phase"] == 2 and "gate_r_mean" in lines[-1]
    assert lines[-1]["fvu"] < lines[0]["fvu"]
    report = json.loads((out / "eval.json").read_text())
    assert report["retain"]["tokens"] == 1000 and 0 < report["retain"]["fvu"] < 1
    assert report["candidates"]["n"] == int(feats["candidate"].sum())
    assert report["candidates"]["unlearn_mass_share"] > report["candidates"]["retain_mass_share"]


def test_baseline_run(tmp_path):
    summary = run(tmp_path / "base", CFG.replace(method="baseline", compare_n=5))
    feats = load_file(str(tmp_path / "base" / "features.safetensors"))
    assert (feats["cluster"] == -1).all() and int(feats["candidate"].sum()) <= 5
    assert summary.eval["candidates"]["set"] == "saebench"
    sizes = [s["n"] for s in summary.eval["saebench"]["sets"]]
    assert 5 in sizes or summary.eval["candidates"]["n"] < 5
    text = (tmp_path / "base" / "metrics.jsonl").read_text()
    lines = [json.loads(ln) for ln in text.splitlines()]
    assert all(ln["phase"] == 1 and "mse_u" in ln for ln in lines)


def test_killed_and_resumed_run_matches_uninterrupted(tmp_path):
    run(tmp_path / "straight")
    killed = tmp_path / "killed"
    assert run(killed, kill_at=13) is None  # phase 1, one step past the checkpoint at 12
    assert run(killed, kill_at=27, resume=True) is None  # phase 2, after clustering
    run(killed, resume=True)
    for name in ("sae.safetensors", "features.safetensors"):
        a, b = load_file(str(tmp_path / "straight" / name)), load_file(str(killed / name))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for name in ("clusters.json", "eval.json", "metrics.jsonl"):
        assert (tmp_path / "straight" / name).read_text() == (killed / name).read_text(), name


def test_resume_checks_config_and_accepts_none(tmp_path):
    out = tmp_path / "run"
    run(out, kill_at=6)
    with pytest.raises(TrainError, match="l1"):
        run(out, CFG.replace(l1=0.5), resume=True)
    x_r, x_u = toy_data()
    r, u = streams(x_r, x_u)
    summary = train_on_streams(None, r, u, d_model=D, out=out, held_out=held_out(x_r, x_u),
                               resume=True)
    assert summary.steps == CFG.steps and (out / "eval.json").is_file()
    r.close(), u.close()


def test_existing_run_folder_needs_resume_or_overwrite(tmp_path):
    out = tmp_path / "run"
    run(out, kill_at=2)
    with pytest.raises(TrainError, match="exists"):
        run(out)
    assert run(out, overwrite=True) is not None
    other = tmp_path / "not_a_run"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(TrainError, match="not a run folder"):
        run(other, overwrite=True)
    assert (other / "precious.txt").exists()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path):
    x_r, x_u = toy_data()
    x_u = x_u.clone()
    x_u[:] = float("inf")  # phase 2 (from step 20) reads unlearn data
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="step 20"):
        run(out, data=(x_r, x_u))
    ck = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ck["step"] == 20 and torch.isfinite(ck["sae"]["W_dec"]).all()
    assert not (out / "sae.safetensors").exists()


def test_config_presets_and_lenient_loading():
    paper = TrainConfig.preset("paper")
    assert (paper.expansion, paper.n_clusters, paper.l1, paper.beta, paper.lr, paper.warmup,
            paper.batch_contexts, paper.recluster_every) == (32, 32, 0.04, 0.9, 3e-4, 1000, 32, 100)
    demo = TrainConfig.preset("demo")
    assert demo.steps < paper.steps and demo.expansion < paper.expansion
    assert TrainConfig.from_dict({**demo.to_dict(), "model": "x", "retired": 1}) == demo
    with pytest.raises(TrainError):
        demo.replace(no_such_option=1)
    with pytest.raises(TrainError):
        TrainConfig(method="other")


def test_any_iterator_works_and_nan_in_phase_1_stops(tmp_path):
    x_r, x_u = toy_data()

    def batches(x, bad_from=None):
        for i in range(10_000):
            b = x[(i * 64) % 4992:][:64]
            yield b * float("nan") if bad_from is not None and i >= bad_from else b

    cfg = CFG.replace(method="baseline")
    summary = train_on_streams(cfg, batches(x_r), batches(x_u), d_model=D, out=tmp_path / "ok")
    assert summary.eval["retain"]["tokens"] == 0  # no held-out data given: metrics are NaN
    # batch 0 initialises b_dec, so step 9 reads batch 10
    with pytest.raises(NonFiniteLossError, match="loss is not finite at step 9.*step 8"):
        train_on_streams(cfg, batches(x_r, bad_from=10), batches(x_u), d_model=D,
                         out=tmp_path / "bad")


# `kill -9` of `ff train` itself (a subprocess), mid phase 1 and then mid phase 2 of the resumed
# run, then `ff train --resume`: the same weights as an uninterrupted run. A shim around the CLI
# checkpoints and logs every few steps (the demo preset does so every 100) and slows each step
# down, so that the kills land where they are aimed.
KILL_SHIM = """
import sys, time
import trainer.config as c, trainer.steps as s
c.PRESETS["demo"] = {**c.PRESETS["demo"], "checkpoint_every": 3, "log_every": 1}
step = s.train_step
s.train_step = lambda *a, **k: (time.sleep(0.05), step(*a, **k))[1]
from cli import main
main(prog_name="ff")
"""


def _last_logged_step(metrics) -> int:
    try:
        lines = metrics.read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError):  # not there yet, or a line being written
        return 0


def _kill_when_logged(args, out, step, cwd):
    """Run `ff ARGS` in a subprocess and SIGKILL it once metrics.jsonl reaches `step`."""
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-c", KILL_SHIM, *args], cwd=cwd,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while proc.poll() is None and time.time() < deadline:
        if _last_logged_step(out / "metrics.jsonl") >= step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    assert proc.wait() == -signal.SIGKILL, "the run ended before it could be killed"
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]


def test_kill_9_of_ff_train_in_both_phases_then_resume_matches(tmp_path, monkeypatch):
    from pathlib import Path

    from click.testing import CliRunner
    from conftest import make_store

    from cli import main
    from trainer.config import PRESETS

    monkeypatch.setitem(PRESETS, "demo", {**PRESETS["demo"], "checkpoint_every": 3, "log_every": 1})
    store = make_store(tmp_path / "s.zarr")
    args = ["train", "--store", str(store), "--layer", "1", "--preset", "demo", "--set", "steps=20",
            "--set", "expansion=2", "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=2",
            "--set", "recluster_every=4", "--quiet"]
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert CliRunner().invoke(main, [*args, "--out", str(straight)]).exit_code == 0
    root = Path(__file__).resolve().parents[1]
    saved = _kill_when_logged([*args, "--out", str(killed)], killed, 4, root)
    assert 3 <= saved < 10  # phase 1 is steps 0-9
    saved = _kill_when_logged([*args, "--out", str(killed), "--resume"], killed, 14, root)
    assert 12 <= saved < 20  # in phase 2, after the importance passes and clustering
    r = CliRunner().invoke(main, [*args, "--out", str(killed), "--resume"])
    assert r.exit_code == 0, r.output
    for name in ("sae.safetensors", "features.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(killed / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert (straight / "metrics.jsonl").read_text() == (killed / "metrics.jsonl").read_text()
