"""`ff train --resume`: the options in RESUME_MAY_CHANGE (steps, lr, bookkeeping) apply, any
other change is refused naming it, and config.json records what is in effect."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_store

from cli import main
from trainer.config import TrainConfig
from trainer.run import RESUME_MAY_CHANGE, RunFolder
from trainer.steps import lr_at
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")

CFG = TrainConfig(expansion=2, n_clusters=2, steps=12, warmup=2, batch_contexts=4, lr=3e-3,
                  recluster_every=2, importance_batches=1, log_every=1, checkpoint_every=3,
                  buffer_chunks=2, eval_frac=0.2, scale_chunks=2)


def run(*args):
    r = CliRunner().invoke(main, [str(a) for a in args])
    return r.exit_code, r.output.strip()


def killed_run(tmp_path, at: int = 5):
    """A run of CFG stopped after step `at` (its checkpoint is at the multiple of 3 below)."""
    store = make_store(tmp_path / "s.zarr")

    def stop(step):
        if step == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CFG, str(store), 1, str(tmp_path / "run"), progress=False, on_step=stop)
    return store, RunFolder(tmp_path / "run")


def logged(rf: RunFolder) -> dict[int, float]:
    return {r["step"]: r["lr"] for r in map(json.loads, rf.metrics.read_text().splitlines())}


def test_steps_and_lr_may_change_on_resume():
    assert {"steps", "lr"} <= set(RESUME_MAY_CHANGE) and "l1" not in RESUME_MAY_CHANGE


def test_resume_with_a_new_lr_trains_on_with_it(tmp_path):
    store, rf = killed_run(tmp_path)
    code, out = run("train", "--store", store, "--layer", 1, "--out", rf.path, "--resume",
                    "--set", "lr=1e-3", "--quiet")
    assert code == 0, out
    new = CFG.replace(lr=1e-3)
    lrs = logged(rf)
    assert sorted(lrs) == list(range(1, 13))
    for step, lr in lrs.items():  # the record of step s logs the lr of its last update, s - 1
        want = lr_at(CFG if step <= 3 else new, step - 1)
        assert lr == pytest.approx(want, rel=1e-12), step
    ck = torch.load(rf.checkpoint, weights_only=True)
    sae_group, gate_group = ck["opt"]["param_groups"][0], ck["opt"]["param_groups"][-1]
    assert ck["step"] == 12 and sae_group["lr"] == pytest.approx(lr_at(new, 11))
    # the gates keep the checkpoint's ratio to lr (gate_lr / the lr the run started with)
    assert gate_group["lr"] == pytest.approx(lr_at(new, 11) * CFG.gate_lr / CFG.lr)
    config = rf.read_config()
    assert config["lr"] == 1e-3 and config["resumed_with"] == [{"lr": [3e-3, 1e-3]}]


def test_a_second_resume_keeps_the_new_lr(tmp_path):
    store, rf = killed_run(tmp_path)
    args = ["train", "--store", store, "--layer", 1, "--out", rf.path, "--resume", "--quiet"]

    def stop(step):
        if step == 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CFG.replace(lr=1e-3), str(store), 1, str(rf.path), resume=True, progress=False,
              on_step=stop)
    assert run(*args)[0] == 0  # no --lr: the lr in effect, 1e-3, not the first one
    assert logged(rf)[12] == pytest.approx(lr_at(CFG.replace(lr=1e-3), 11))


def test_more_steps_extend_a_finished_run(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    rf = RunFolder(tmp_path / "run")
    train(CFG, str(store), 1, str(rf.path), progress=False)
    code, out = run("train", "--store", store, "--layer", 1, "--out", rf.path, "--resume",
                    "--set", "steps=20", "--quiet")
    assert code == 0, out
    config = rf.read_config()
    assert config["steps"] == 20 and config["resumed_with"][0]["steps"] == [12, 20]
    assert TrainConfig.from_dict(config).phase1_steps == CFG.phase1_steps  # the boundary stays
    assert max(logged(rf)) == 20 and rf.eval.is_file()
    assert torch.load(rf.checkpoint, weights_only=True)["step"] == 20
    assert run("verify", rf.path)[0] == 0


def test_same_command_line_with_the_preset_named_again_resumes(tmp_path):
    store = make_store(tmp_path / "s.zarr")
    args = ["train", "--store", store, "--layer", 1, "--preset", "demo", "--set", "steps=6",
            "--set", "expansion=2", "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=1",
            "--quiet", "--out", tmp_path / "run"]
    assert run(*args)[0] == 0
    code, out = run(*args, "--resume")
    assert code == 0, out
    code, out = run(*args[:-2], "--out", tmp_path / "run", "--resume", "--preset", "paper")
    assert code == 2 and "cannot resume" in out and "the run used" in out, out
