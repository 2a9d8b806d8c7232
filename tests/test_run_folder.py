"""The run folder has one owner (trainer/run.py): its file names are written there only, and
config.json is read as a typed, versioned RunConfig."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_pipelines_helpers import make_run

from cli import main
from pipelines.intervene import load_run
from trainer.errors import TrainError
from trainer.run import RUN_FORMAT, RunConfig, RunFolder

ROOT = Path(__file__).resolve().parents[1]
NAMES = ("config.json", "sae.safetensors", "features.safetensors", "gate.safetensors", "clusters.json",
         "metrics.jsonl", "eval.json", "unlearning.json", "last.pt")


def test_run_folder_file_names_are_literals_in_one_module():
    """Outside trainer/run.py no source file spells a run-folder file name (cache/models.py's
    config.json is a Hugging Face model folder's, pipelines/artifact.py's too)."""
    allowed = {"trainer/run.py", "cache/models.py", "pipelines/artifact.py"}
    found = []
    for path in sorted(ROOT.glob("*.py")) + sorted(ROOT.glob("*/**/*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.startswith(("tests/", ".venv/")) or rel in allowed:
            continue
        for name in NAMES:
            if re.search(rf"[\"']{re.escape(name)}[\"']", path.read_text()):
                found.append(f"{rel}: {name}")
    assert not found, found


def test_config_reads_typed_and_round_trips(tmp_path, tiny_model):
    from cache.models import load_model

    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, 1, lm.info.weights_hash)
    raw = json.loads(RunFolder(run_dir).config.read_text())
    cfg = RunFolder(run_dir).run_config()
    assert isinstance(cfg, RunConfig) and cfg.layer == 1 and cfg.d_model == lm.info.d_model
    assert cfg.model_hash == lm.info.weights_hash and cfg.train.method == raw.get("method", "featureforget")
    written = cfg.to_dict()
    assert all(written[k] == v for k, v in raw.items() if k != "format")  # what was on disk stays
    assert RunConfig.from_dict(written) == cfg and cfg.format == raw.get("format", 1)
    assert load_run(run_dir).config == cfg


def test_a_config_from_a_newer_ff_is_refused_in_one_line(tmp_path, tiny_model):
    from cache.models import load_model

    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, 1, lm.info.weights_hash)
    folder = RunFolder(run_dir)
    raw = json.loads(folder.config.read_text())
    folder.config.write_text(json.dumps({**raw, "format": RUN_FORMAT + 1}))
    with pytest.raises(TrainError, match=rf"has format {RUN_FORMAT + 1}, newer than this ff reads"):
        folder.run_config()
    r = CliRunner().invoke(main, ["generate", "--run", str(run_dir), "--prompt", "x", "--set", "multiplier=2"])
    assert r.exit_code == 2 and r.output.startswith("error: ") and "newer than this ff reads" in r.output
    assert len(r.output.strip().splitlines()) == 1
    folder.config.write_text(json.dumps({k: v for k, v in raw.items() if k != "scale"}))
    with pytest.raises(TrainError, match="lacks scale"):
        folder.run_config()
