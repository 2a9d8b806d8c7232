"""`torchrun ... ff train` (trainer/dist.py, docs/scaling.md "Distributed training"): two gloo
processes train what one process trains on the same global batches, and a two-process run
interrupted mid phase 2 resumes under torchrun to the uninterrupted two-process result.

Tolerance of 2 processes against 1 after 50 steps (the sums are added in another order, nothing
else differs): SAE weights within 1e-5 of their largest value (measured: 3e-7), per-feature
statistics within 1e-5 relative (measured: 3e-7), the candidate set equal up to one feature
(measured: equal). A resumed two-process run equals the uninterrupted one exactly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import make_store
from safetensors.torch import load_file

from cli import main
from trainer.config import PRESETS
from trainer.data import ArraySource, TokenStream

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = Path(sys.executable).parent / "torchrun"
STEPS = 50

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not torch.distributed.is_available(),
                                 reason="this torch build has no torch.distributed")]

# The demo preset, with a checkpoint every 3 steps and a log line every step, as in
# test_trainer_train.py; FF_TEST_STOP_AT=k ends every rank abruptly (os._exit) as it is about
# to take step k of a fresh run, as a crash of the job would. Each rank prints the exit status
# of each command and goes on to the next.
SHIM = """
import json, os, sys
sys.path.insert(0, {root!r})
import trainer.config as c, trainer.steps as s
c.PRESETS["demo"] = {{**c.PRESETS["demo"], **{preset!r}}}
stop, step, calls = int(os.environ.get("FF_TEST_STOP_AT", "0")), s.train_step, [0]
def counted(*a, **k):
    calls[0] += 1
    if stop and calls[0] == stop + 1:
        os._exit(3)
    return step(*a, **k)
s.train_step = counted
from cli import main
for args in json.loads(sys.argv[1]):
    try:
        main(args, prog_name="ff", standalone_mode=False)
        print("exit 0", flush=True)
    except SystemExit as e:
        print(f"exit {{e.code}}", flush=True)
"""
PRESET = {"checkpoint_every": 3, "log_every": 1}


def train_args(store, out, method="featureforget") -> list[str]:
    return ["train", "--store", str(store), "--layer", "1", "--out", str(out), "--preset", "demo",
            "--set", f"method={method}", "--set", f"steps={STEPS}", "--set", "expansion=4", "--set", "n_clusters=2",
            "--set", "batch_contexts=8", "--set", "warmup=5", "--set", "lr=3e-3", "--set", "l1=0.05",
            "--set", "recluster_every=5", "--set", "candidate_max_freq_r=0.5", "--quiet"]


def torchrun(tmp: Path, runs: list[list[str]], *, stop_at: int = 0) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc-per-node 2` of the CLI, one `ff` command after another."""
    shim = tmp / "shim.py"
    shim.write_text(SHIM.format(root=str(ROOT), preset=PRESET))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FF_TEST_STOP_AT": str(stop_at)}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", str(shim),
                           json.dumps(runs)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def two_procs(tmp_path_factory):
    """One torchrun launch: a FeatureForget and a baseline run of two processes each, then the
    first again, which the existing run folder refuses."""
    tmp = tmp_path_factory.mktemp("ddp")
    store = make_store(tmp / "s.zarr")
    outs = {m: tmp / m for m in ("featureforget", "baseline")}
    runs = [train_args(store, out, m) for m, out in outs.items()]
    r = torchrun(tmp, [*runs, runs[0]])
    assert r.returncode == 0, r.stderr[-3000:]
    return store, outs, r


def one_proc(monkeypatch, store, out, method="featureforget") -> None:
    monkeypatch.setitem(PRESETS, "demo", {**PRESETS["demo"], **PRESET})
    r = CliRunner().invoke(main, train_args(store, out, method))
    assert r.exit_code == 0, r.output


def assert_close_runs(one: Path, two: Path) -> None:
    a, b = load_file(str(one / "sae.safetensors")), load_file(str(two / "sae.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5 * float(a[k].abs().max()))
    fa, fb = (load_file(str(run / "features.safetensors")) for run in (one, two))
    assert fa.keys() == fb.keys()
    for k in fa:
        if fa[k].is_floating_point():
            torch.testing.assert_close(fb[k], fa[k], rtol=1e-5, atol=1e-7, msg=k)
    assert int((fa["candidate"] ^ fb["candidate"]).sum()) <= 1
    la, lb = ([json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (one, two))
    assert [r["step"] for r in lb] == list(range(1, STEPS + 1))  # rank 0 alone logs
    for ra, rb in zip(la, lb):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-5) and rb["l0"] == ra["l0"]


def test_two_processes_train_what_one_process_trains(two_procs, tmp_path, monkeypatch):
    store, outs, r = two_procs
    for method, two in outs.items():
        one_proc(monkeypatch, store, tmp_path / method, method)
        assert_close_runs(tmp_path / method, two)
    # one summary per run: rank 0 reports
    assert r.stdout.count("featureforget layer 1") == 1 and r.stdout.count("baseline layer 1") == 1
    # a user error found on rank 0 (the run folder exists) stops both ranks, none waits for it
    assert r.stdout.count("exit 0") == 4 and r.stdout.count("exit 2") == 2
    assert "pass --resume to continue it or --overwrite" in r.stderr
    assert json.loads((outs["featureforget"] / "eval.json").read_text())["candidates"]["n"] > 0


def test_interrupted_two_process_run_resumes_under_torchrun(two_procs, tmp_path):
    store, outs, _ = two_procs
    out = tmp_path / "run"  # stopped in phase 2 (it starts at step 25), after a recluster
    r = torchrun(tmp_path, [train_args(store, out)], stop_at=32)
    assert r.returncode != 0
    saved = torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"]
    assert 25 < saved <= 32
    r = torchrun(tmp_path, [[*train_args(store, out), "--resume"]])
    assert r.returncode == 0, r.stderr[-3000:]
    straight = outs["featureforget"]
    for name in ("sae.safetensors", "features.safetensors", "gate.safetensors"):
        a, b = load_file(str(straight / name)), load_file(str(out / name))
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    for name in ("metrics.jsonl", "clusters.json"):
        assert (straight / name).read_text() == (out / name).read_text(), name


# ---- the data split, without processes -------------------------------------------------


class CountingSource(ArraySource):
    """ArraySource that records which chunks it read."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.reads: list[int] = []

    def read_stored(self, k: int):
        self.reads.append(k)
        return super().read_stored(k)


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_batches_together_are_the_single_process_batches(world):
    x_ND = np.arange(1003 * 2, dtype=np.float32).reshape(1003, 2)  # rows tell tokens apart
    kw = dict(batch_size=40, buffer_chunks=4, seed=5, prefetch=False)
    one = TokenStream(ArraySource(x_ND, 37), **kw)
    srcs = [CountingSource(x_ND, 37) for _ in range(world)]
    ranks = [TokenStream(src, rank=r, world=world, **kw) for r, src in enumerate(srcs)]
    for _ in range(60):  # more than two epochs, short last buffers included
        whole = next(one)
        parts = [next(s) for s in ranks]
        assert all(0 < len(p) < len(whole) for p in parts)
        got = torch.cat(parts)
        assert torch.equal(got[got[:, 0].argsort()], whole[whole[:, 0].argsort()])
        assert all(s.state_dict() == one.state_dict() for s in ranks)
    # each rank reads about 1/world of the chunks: a chunk cut by a share boundary is read twice
    reads = [len(src.reads) for src in srcs]
    buffers = one.epoch * len(one._groups(0)) + one.buffer + 1
    assert sum(reads) <= len(srcs[0]) * (one.epoch + 1) + (world - 1) * buffers
    assert max(reads) < 0.6 * sum(reads)
