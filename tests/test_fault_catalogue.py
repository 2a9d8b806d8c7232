"""The fault catalogue of docs/reliability.md, one row per case: a user mistake or a fault, then
the command through the CLI. Each user error is one line on stderr starting with "error:" and
exit status 2 (`ff verify` reports problems on stdout with exit status 1), never a traceback,
and nothing on disk changes. The tiny random model and tiny stores only."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import pytest
from click.testing import CliRunner
from conftest import make_store
from test_verify import CFG, delete_chunk, flip_bits

from cli import main
from trainer.train import train

pytestmark = pytest.mark.usefixtures("one_thread")
PROGRESS_BAR = re.compile(r"\|\s*\d+/\d+ \[")  # transformers' "Loading weights" bar


class World(NamedTuple):
    """Fresh copies, per case, of what a user has on disk."""

    root: Path
    store: Path
    """A complete tiny store written without a model (conftest.make_store)."""
    cached: Path
    """A complete store made by `ff cache` from the tiny model (`cache_args` rebuild it)."""
    run: Path
    """A finished run of CFG on `store`, layer 1."""
    stopped: Path
    """The same run stopped after step 5 (checkpoint at step 3)."""
    model: str
    corpora: tuple[str, str]

    def cache_args(self, out, *extra) -> list:
        return ["cache", "--model", self.model, "--retain", self.corpora[0], "--unlearn",
                self.corpora[1], "--contexts", 8, "--set", "ctx_len=16", "--layers", 1,
                "--set", "chunk_contexts=2", "--quiet", "--out", out, *extra]

    def train_args(self, out, *extra) -> list:
        return ["train", "--store", self.store, "--layer", 1, "--quiet", "--out", out, *extra]


@pytest.fixture(scope="module")
def originals(tmp_path_factory, tiny_model, tiny_corpora) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("originals")
    store = make_store(d / "s.zarr")
    train(CFG, str(store), 1, str(d / "run"), progress=False)

    def stop(step):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(CFG, str(store), 1, str(d / "stopped"), progress=False, on_step=stop)
    w = World(d, store, d / "cached.zarr", d / "run", d / "stopped", tiny_model, tiny_corpora)
    assert invoke(*w.cache_args(w.cached)).exit_code == 0
    return {k: getattr(w, k) for k in ("store", "cached", "run", "stopped")}


@pytest.fixture
def world(tmp_path, originals, tiny_model, tiny_corpora) -> World:
    copies = {}
    for name, src in originals.items():
        copies[name] = tmp_path / "w" / src.name
        shutil.copytree(src, copies[name])
    return World(tmp_path / "w", **copies, model=tiny_model, corpora=tiny_corpora)


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def snapshot(root: Path) -> dict[Path, bytes | None]:
    """Every file (its bytes) and every folder (None) under `root`: a new empty folder counts."""
    return {p: p.read_bytes() if p.is_file() else None for p in root.rglob("*")}


def garble(path: Path, text: str = '{"zarr_format": 3, "node_ty') -> None:
    path.write_text(text)


def append(path: Path, text: str) -> None:
    with path.open("a") as f:
        f.write(text)


def check_result(r, code: int, needle: str) -> None:
    """Exit status; no traceback; one `error:` line on stderr holding `needle` (status 2), or
    `needle` in the stdout report (status 1) or output (status 0)."""
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exc_info
    assert "Traceback" not in r.output
    assert r.exit_code == code, r.output
    errors = [ln for ln in r.stderr.splitlines() if ln.strip() and not PROGRESS_BAR.search(ln)]
    if code == 2:
        assert len(errors) == 1 and errors[0].startswith("error: "), r.stderr
        assert needle in errors[0], errors[0]
    else:
        assert errors == [] and needle in r.stdout, r.output


class Fault(NamedTuple):
    id: str
    make: Callable[[World], list]
    """Does the damage (or nothing), and returns the command's arguments."""
    code: int
    needle: str
    """The message, or the part of it that does not name paths or values of this test."""
    before_load: bool = False
    """The row promises the error comes before the model loads: the test makes loading fail."""


def _jsonl(w: World, line: str) -> list:
    bad = w.root / "bad.jsonl"
    bad.write_text('{"text": "the cell gene protein"}\n' + line + "\n")
    return w.cache_args(w.root / "new.zarr")[:4] + [bad, *w.cache_args(w.root / "new.zarr")[5:]]


def _mark_incomplete(store: Path) -> None:
    root = json.loads((store / "zarr.json").read_text())
    root["attributes"]["complete"] = False
    (store / "zarr.json").write_text(json.dumps(root))


def _incomplete_with_corrupt_tokens(w: World) -> list:
    root = json.loads((w.cached / "zarr.json").read_text())
    root["attributes"]["complete"] = False
    (w.cached / "zarr.json").write_text(json.dumps(root))
    flip_bits(w.cached, "retain", "tokens", 1)
    return w.cache_args(w.cached)


def _finished_without_checkpoint(w: World) -> list:
    shutil.rmtree(w.run / "checkpoints")
    return w.train_args(w.run, "--resume", "--set", "steps=20")


def _model(w: World, spec: Path) -> list:
    args = w.cache_args(w.root / "new.zarr")
    return [*args[:2], spec, *args[3:]]


FAULTS = [
    # ff cache / ff inspect: models, corpora and stores
    Fault("cache-model-folder-without-config",
          lambda w: ((w.root / "m").mkdir(), _model(w, w.root / "m"))[1], 2,
          "has no config.json: not a Hugging Face model folder"),
    Fault("cache-model-file-not-gguf",
          lambda w: ((w.root / "m.bin").write_text("x"), _model(w, w.root / "m.bin"))[1], 2,
          "is a file but not a .gguf file"),
    Fault("cache-jsonl-null-text", lambda w: _jsonl(w, '{"text": null}'), 2,
          "bad.jsonl:2: the 'text' field is null, not a string"),
    Fault("cache-jsonl-number-text", lambda w: _jsonl(w, '{"text": 42}'), 2,
          "bad.jsonl:2: the 'text' field is 42, not a string"),
    Fault("cache-corrupt-root-zarr-json",
          lambda w: (garble(w.cached / "zarr.json"), w.cache_args(w.cached))[1], 2,
          "zarr.json does not parse"),
    Fault("cache-resume-corrupt-tokens-chunk", _incomplete_with_corrupt_tokens, 2,
          "retain/tokens chunk 1 (contexts 2-3) of store"),
    Fault("cache-repair-no-store", lambda w: w.cache_args(w.root / "none.zarr", "--repair"), 2,
          "nothing to repair"),
    Fault("cache-repair-and-overwrite",
          lambda w: w.cache_args(w.cached, "--repair", "--overwrite"), 2,
          "use --repair or --overwrite, not both"),
    Fault("cache-repair-healthy", lambda w: w.cache_args(w.cached, "--repair"), 0,
          "every chunk verifies, nothing to repair"),
    Fault("inspect-corrupt-group-zarr-json",
          lambda w: (garble(w.store / "retain" / "zarr.json"), ["inspect", w.store])[1], 2,
          "retain/zarr.json does not parse"),
    Fault("inspect-corrupt-tokens-chunk",
          lambda w: (flip_bits(w.store, "retain", "tokens", 1), ["inspect", w.store])[1], 2,
          "retain/tokens chunk 1 (contexts 4-7) of store"),
    Fault("verify-corrupt-root-zarr-json",
          lambda w: (garble(w.store / "zarr.json"), ["verify", w.store])[1], 1,
          "BAD  zarr.json: corrupt: does not parse"),
    Fault("verify-corrupt-array-zarr-json",
          lambda w: (garble(w.store / "retain" / "layer_1" / "zarr.json", "[1, 2"),
                     ["verify", w.store])[1], 1, "BAD  retain/layer_1/zarr.json: corrupt"),
    # ff train: options, stores, run folders, resumes
    Fault("train-corrupt-root-zarr-json",
          lambda w: (garble(w.store / "zarr.json"), w.train_args(w.root / "r"))[1], 2,
          "zarr.json does not parse"),
    Fault("train-store-missing",
          lambda w: ["train", "--store", w.root / "no.zarr", "--layer", 1, "--out", w.root / "r"],
          2, "is not an activation store (no zarr.json)"),
    Fault("train-missing-held-out-tokens-chunk",  # held out: checked before any step
          lambda w: (delete_chunk(w.store, "unlearn", "tokens", 5), w.train_args(w.root / "r"))[1], 2,
          "unlearn/tokens chunk 5 (contexts 20-23) of store"),
    Fault("train-incomplete-store", lambda w: (_mark_incomplete(w.store), w.train_args(w.root / "r"))[1], 2,
          "is incomplete; rerun the same `ff cache` command to finish it"),
    Fault("train-layer-not-in-store", lambda w: ["train", "--store", w.store, "--layer", 5, "--out", w.root / "r"],
          2, "layer 5 is not in"),
    Fault("train-store-not-a-store", lambda w: ["train", "--store", w.run, "--layer", 1, "--out", w.root / "r"],
          2, "not an activation store"),
    Fault("train-unlearn-store-of-another-model",
          lambda w: w.train_args(w.root / "r", "--unlearn-store", make_store(w.root / "o.zarr", model_hash="h2")),
          2, "differ in model_hash"),
    Fault("train-unlearn-store-of-another-width",
          lambda w: w.train_args(w.root / "r", "--unlearn-store", make_store(w.root / "d.zarr", d_model=4)),
          2, "differ in d_model"),
    Fault("train-overwrite-a-folder-that-is-not-a-run",
          lambda w: ((w.root / "notes").mkdir(), (w.root / "notes" / "precious.txt").write_text("keep me"),
                     w.train_args(w.root / "notes", "--overwrite"))[2], 2,
          "is not empty and not a run folder; refusing to delete it"),
    Fault("train-lr-0", lambda w: w.train_args(w.root / "r", "--set", "lr=0"), 2,
          "learning rates must be > 0, got lr=0.0"),
    Fault("train-lr-negative", lambda w: w.train_args(w.root / "r", "--set", "lr=-1e-3"), 2,
          "learning rates must be > 0, got lr=-0.001"),
    Fault("train-gate-lr-0", lambda w: w.train_args(w.root / "r", "--set", "gate_lr=0"), 2,
          "learning rates must be > 0, got gate_lr=0.0"),
    Fault("train-probe-layer-not-cached", lambda w: w.train_args(w.root / "r", "--set", "probe_offset=1"), 2,
          "the probe reads layer 0 (probe_offset=1): layer 0 is not in"),
    Fault("train-probe-offset-before-layer-0", lambda w: w.train_args(w.root / "r", "--set", "probe_offset=2"), 2,
          "probe_offset=2 points before layer 0 (the run trains layer 1)"),
    Fault("train-out-is-a-file",
          lambda w: ((w.root / "f").write_text("x"), w.train_args(w.root / "f"))[1], 2,
          "is a file, not a run folder"),
    Fault("train-run-exists", lambda w: w.train_args(w.stopped), 2,
          "exists; pass --resume to continue it or --overwrite to start again"),
    Fault("train-resume-changed-l1", lambda w: w.train_args(w.stopped, "--resume", "--set", "l1=0.5"), 2,
          "with l1=0.5: the run used 0.04; only steps, lr, log_every, checkpoint_every, device"),
    Fault("train-resume-changed-seed", lambda w: w.train_args(w.stopped, "--resume", "--set", "seed=7"),
          2, "with seed=7: the run used 0"),
    Fault("train-resume-changed-method",
          lambda w: w.train_args(w.stopped, "--resume", "--set", "method=baseline"), 2,
          "with method='baseline': the run used 'featureforget'"),
    Fault("train-resume-fewer-steps", lambda w: w.train_args(w.stopped, "--resume", "--set", "steps=4"),
          2, "steps may only grow on resume"),
    Fault("train-resume-finished-new-lr",
          lambda w: w.train_args(w.run, "--resume", "--set", "lr=1e-3"), 2,
          "is finished: lr=0.001 would train nothing; pass --set steps=N with N above 6"),
    Fault("train-resume-nothing", lambda w: w.train_args(w.root / "none", "--resume"), 2,
          "nothing to resume"),
    Fault("train-resume-and-overwrite",
          lambda w: w.train_args(w.stopped, "--resume", "--overwrite"), 2,
          "use --resume or --overwrite, not both"),
    Fault("train-resume-corrupt-checkpoint",
          lambda w: ((w.stopped / "checkpoints" / "last.pt").write_bytes(b"PK\x03\x04 half"),
                     w.train_args(w.stopped, "--resume"))[1], 2, "cannot load checkpoint"),
    Fault("train-resume-corrupt-config",
          lambda w: (garble(w.stopped / "config.json"), w.train_args(w.stopped, "--resume"))[1],
          2, "config.json (Unterminated string"),
    Fault("train-resume-finished-truncated-sae",
          lambda w: ((w.run / "sae.safetensors").write_bytes(b"\x10"),
                     w.train_args(w.run, "--resume"))[1], 2,
          "is finished but sae.safetensors does not read"),
    Fault("train-extend-without-checkpoint", _finished_without_checkpoint, 2,
          "its final checkpoint"),
    Fault("train-resume-damaged-metrics-line",
          lambda w: (garble(w.stopped / "metrics.jsonl", '{"step": 2}\n{"st\n{"step": 4}\n'),
                     w.train_args(w.stopped, "--resume"))[1], 2,
          "metrics.jsonl line 2 is not a metrics record"),
    # ff verify RUN
    Fault("verify-run-truncated-sae",
          lambda w: ((w.run / "sae.safetensors").write_bytes(b"\x10"), ["verify", w.run])[1], 1,
          "BAD  sae.safetensors: corrupt: does not read"),
    Fault("verify-run-corrupt-checkpoint",
          lambda w: ((w.run / "checkpoints" / "last.pt").write_bytes(b"garbage"),
                     ["verify", w.run])[1], 1, "BAD  checkpoints/last.pt: corrupt"),
    Fault("verify-run-torn-metrics-line",
          lambda w: (append(w.run / "metrics.jsonl", '{"step": 7, "lo'), ["verify", w.run])[1], 1,
          "BAD  metrics.jsonl: corrupt: line 4 does not parse"),
    # ff eval / generate / export on a folder that is not a run
    Fault("eval-multipliers-not-numbers", lambda w: ["eval", "--run", w.run, "--set", "multipliers=abc"],
          2, "--set grid.multipliers=abc: expected a number"),
    Fault("eval-template-without-question", lambda w: ["eval", "--run", w.run, "--set", "mcq_template=Q: {q}"],
          2, "mcq_template may name {question} only", before_load=True),
    Fault("eval-window-not-a-number", lambda w: ["eval", "--run", w.run, "--set", "gate_window=wide"],
          2, "--set grid.gate_window=wide: expected an integer", before_load=True),
    Fault("eval-unknown-format", lambda w: ["eval", "--run", w.run, "--formats", "plain,bogus"],
          2, "unknown prompt format 'bogus'; valid: plain, instruct", before_load=True),
    Fault("eval-not-a-run", lambda w: ["eval", "--run", w.store], 2,
          "is not a run folder (no config.json)"),
    Fault("generate-not-a-run", lambda w: ["generate", "--run", w.store, "--prompt", "hi"], 2,
          "is not a run folder (no config.json)"),
    Fault("generate-torn-unlearning-json",
          lambda w: ((w.run / "unlearning.json").write_text('{"best": {"sett'),
                     ["generate", "--run", w.run, "--prompt", "hi"])[1], 2,
          "is not an ff eval result (JSONDecodeError", before_load=True),
    Fault("export-not-a-run", lambda w: ["export", "--run", w.store, w.root / "out"], 2,
          "has no config.json"),
]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.id for f in FAULTS])
def test_fault(fault: Fault, world: World, monkeypatch):
    args = fault.make(world)
    if fault.before_load:
        import cache.models

        def no_load(*a, **k):
            raise AssertionError("the model was loaded before the error")

        monkeypatch.setattr(cache.models, "load_model", no_load)
    before = snapshot(world.root)
    check_result(invoke(*args), fault.code, fault.needle)
    assert snapshot(world.root) == before  # nothing changed: a refusal, a report, or a no-op


def test_torn_metrics_line_is_dropped_on_resume(world: World):
    """kill -9 mid-write leaves half a line: the resume drops it, as every line past its
    checkpoint, and ends with the log of an uninterrupted run."""
    append(world.stopped / "metrics.jsonl", '{"step": 6, "pha')
    check_result(invoke(*world.train_args(world.stopped, "--resume")), 0, "feature set:")
    resumed, straight = world.stopped / "metrics.jsonl", world.run / "metrics.jsonl"
    assert resumed.read_text() == straight.read_text()


class _Payload:
    """Unpickling this runs `open(path, "w")`: what a checkpoint from someone else could carry."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(world: World):
    import torch

    marker = world.root / "payload-ran"
    last = world.stopped / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    torch.save({**state, "extra": _Payload(marker)}, last)
    before = snapshot(world.root)
    check_result(invoke(*world.train_args(world.stopped, "--resume")), 2, "cannot load checkpoint")
    assert not marker.exists()
    assert snapshot(world.root) == before


def test_catalogue_rows_name_real_tests():
    """docs/reliability.md: at least 30 rows, each naming a test that pytest collects (a
    parametrised id may end in "..."), and every case of this file in a row."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    rows = [ln for ln in (root / "docs" / "reliability.md").read_text().splitlines()
            if re.match(r"\| \d+ \|", ln)]
    assert len(rows) >= 30
    named = [re.search(r"(tests/\w+\.py)::(\w+)(?:\[([^\]]+)\])?", ln) for ln in rows]
    assert all(named), [ln for ln, m in zip(rows, named) if not m]
    files = sorted({m[1] for m in named})
    listing = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                              *files], cwd=root, capture_output=True, text=True)
    collected = {ln.strip() for ln in listing.stdout.splitlines() if "::" in ln}
    for m in named:
        if m[3] is None:  # a function: itself, or any of its parametrised cases
            ok = m[0] in collected or any(c.startswith(m[0] + "[") for c in collected)
        elif m[3].endswith("..."):  # an id given by its beginning
            ok = any(c.startswith(m[0].removesuffix("...]")) for c in collected)
        else:
            ok = m[0] in collected
        assert ok, f"{m[0]} is not a test pytest collects"
    ids = {m[3] for m in named if m[1].endswith("test_fault_catalogue.py") and m[2] == "test_fault"}
    assert ids == {f.id for f in FAULTS}


def test_a_loss_that_turns_non_finite_before_a_checkpoint_stops_with_one_line(world: World):
    """Row 56 through the CLI: unlearn activations that overflow (inf) make phase 2 non-finite;
    `ff train` stops in one line and writes no SAE."""
    import numpy as np
    import zarr

    root = zarr.open_group(str(world.store), mode="r+")
    x = np.asarray(root["unlearn/layer_1"][:])
    x[:, 1:] = np.inf  # BOS positions are masked out anyway
    root["unlearn/layer_1"][:] = x
    out = world.root / "r"
    r = invoke(*world.train_args(out, "--set", "steps=12", "--set", "expansion=2", "--set", "n_clusters=2",
                                 "--set", "batch_contexts=4", "--set", "warmup=1", "--set", "recluster_every=2"))
    # the CLI's checkpoints come every 1000 steps: this run has none yet, and says so (a run that
    # has one names it: tests/test_trainer_train.py::test_non_finite_loss_stops_and_keeps_last_checkpoint)
    check_result(r, 2, "is not finite at step 6, before the first checkpoint; start again with --overwrite")
    assert not (out / "checkpoints" / "last.pt").exists() and not (out / "sae.safetensors").exists()


def test_eval_of_a_run_without_a_probe_gate_is_one_line_before_the_clean_passes(world: World, monkeypatch):
    """Row 91 through the CLI: a run trained (by `ff train`, on the tiny model's store) before the
    probe gate existed; `ff eval --gate none,probe` is refused before any clean pass runs."""
    from safetensors.torch import load_file, save_file

    import pipelines.evalsets

    run = world.root / "old-run"
    r = invoke("train", "--store", world.cached, "--layer", 1, "--out", run, "--set", "steps=4", "--set", "expansion=2",
               "--set", "n_clusters=2", "--set", "batch_contexts=4", "--set", "warmup=1", "--quiet")
    assert r.exit_code == 0, r.output
    gate = {k: v for k, v in load_file(str(run / "gate.safetensors")).items() if not k.startswith("probe")}
    save_file(gate, str(run / "gate.safetensors"))

    def no_clean_pass(*a, **k):
        raise AssertionError("a clean pass ran before the error")

    monkeypatch.setattr(pipelines.evalsets.EvalData, "prepare", no_clean_pass)
    before = snapshot(world.root)
    r = invoke("eval", "--run", run, "--set", "gates=none,probe", "--preset", "demo")
    check_result(r, 2, "has no probe gate on the residual stream (a run from an older ff): retrain it, or sweep "
                       "the other gates with --set gates=both")
    assert snapshot(world.root) == before
