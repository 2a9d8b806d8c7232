"""`ff export --format hf`: a model folder with the run's chosen edit inside the forward pass,
loaded by plain transformers in a process that cannot import ff, equals the hooked edit."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from cli import main
from pipelines.config import Setting
from pipelines.intervene import Intervention, load_run, unlearned
from trainer.gate.causal import firing_share

LAYER = 1

LOAD = textwrap.dedent("""
    import importlib.util, os, sys
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in (getattr(f, "__module__", "") or "")
                        and "editable" not in type(f).__module__]  # ff's editable install
    sys.path[:] = [p for p in sys.path if not os.path.isfile(os.path.join(p or ".", "cli.py"))]
    for name in ("cli", "pipelines", "trainer", "cache"):
        assert importlib.util.find_spec(name) is None, f"ff's {name} is importable"
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    ids, padded, mask = torch.load(sys.argv[2] + ".in")
    with torch.no_grad():
        out = {"logits": model(ids).logits, "padded": model(input_ids=padded, attention_mask=mask).logits,
               "greedy": model.generate(ids[:1, :10], max_new_tokens=8, do_sample=False, pad_token_id=0),
               "class": type(model).__name__}
        try:
            model.generate(ids[:1, :10], max_new_tokens=2, num_beams=2, pad_token_id=0)
        except ValueError as e:
            out["beams"] = str(e)
    torch.save(out, sys.argv[2])
""")


def _chosen_run(lm, tmp_path: Path, setting: Setting) -> Path:
    run_dir = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40, mlp_probe=True,
                       probe_layer=LAYER - 1)
    best = {"setting": setting.to_dict(), "label": setting.label}
    (run_dir / "unlearning.json").write_text(json.dumps({"best": best}))
    return run_dir


def _median_gate(lm, run_dir: Path, ids: torch.Tensor, base: Setting) -> Setting:
    """The probe gate at the median of its running score: open at some positions only."""
    run = load_run(run_dir)
    with torch.no_grad():
        g = lm.model(ids, output_hidden_states=True).hidden_states[LAYER]  # the probe reads block LAYER - 1
        share, seen = firing_share(Intervention(run, base).signal(g), ids != lm.model.config.bos_token_id,
                                   window=base.gate_window)
    return base.replace(gate_threshold=float(share[seen >= 8].median()) + run.gate.detector(kind="mlp").b)


@pytest.mark.parametrize("mode", ["clamp", "project"])
def test_exported_folder_loads_without_ff_and_equals_the_hooked_edit(tiny_model, tmp_path, mode):
    lm = load_model(tiny_model, device="cpu")
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(4, lm.model.config.vocab_size, (3, 28), generator=g)
    ids[:, 0] = lm.model.config.bos_token_id
    base = Setting(mode=mode, multiplier=30.0, top_n=20, gate="probe", probe_kind="mlp", gate_threshold=0.0,
                   gate_window=6)
    run_dir = _chosen_run(lm, tmp_path, base)
    setting = _median_gate(lm, run_dir, ids, base)
    (run_dir / "unlearning.json").write_text(json.dumps({"best": {"setting": setting.to_dict()}}))
    out = tmp_path / "export"
    r = CliRunner().invoke(main, ["export", "--run", str(run_dir), "--format", "hf", "--model", tiny_model, str(out)])
    assert r.exit_code == 0, r.output
    assert "logits match the hooked edit" in r.output
    written = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "modeling_featureforget.py", "README.md"} <= written
    assert setting.label in (out / "README.md").read_text()

    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # row 1 left-padded: its first 5 tokens are padding
    ids_padded = ids.clone()
    ids_padded[1, :5] = 0
    ids_padded[1, 5] = lm.model.config.bos_token_id
    torch.save((ids, ids_padded, mask), tmp_path / "res.in")
    proc = subprocess.run([sys.executable, "-I", "-c", LOAD, str(out), str(tmp_path / "res")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = torch.load(tmp_path / "res")
    assert got["class"] == "FeatureForgetForCausalLM"
    assert "beam search reorders rows" in got.get("beams", ""), "beam search is refused, not silently wrong"

    with torch.no_grad():
        clean = lm.model(ids).logits
        with unlearned(lm.model, run_dir) as iv:
            assert iv.setting.to_dict() == setting.to_dict()
            want = lm.model(ids).logits
            greedy = lm.model.generate(ids[:1, :10], max_new_tokens=8, do_sample=False, pad_token_id=0)
            alone = lm.model(torch.cat([ids[1:2, 5:6] * 0 + lm.model.config.bos_token_id, ids[1:2, 6:]], 1)).logits
    assert not torch.allclose(want, clean, atol=1e-4), "the edit changes the logits somewhere"
    torch.testing.assert_close(got["logits"], want, atol=1e-4, rtol=1e-4)
    assert torch.equal(got["greedy"], greedy)
    # a left-padded row scores as the same row alone (padding is never editable, never counted)
    torch.testing.assert_close(got["padded"][1, 5:], alone[0], atol=1e-4, rtol=1e-4)


def test_export_hf_refuses_bad_input_with_one_line_and_writes_nothing(tiny_model, tmp_path):
    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40)
    out = tmp_path / "export"

    def export(*extra: str):
        return CliRunner().invoke(main, ["export", "--run", str(run_dir), "--format", "hf", "--model", tiny_model,
                                         *extra, str(out)])

    r = export()  # no unlearning.json: nothing was measured, nothing to ship
    assert r.exit_code == 2 and "has no unlearning.json: evaluate it first" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    (run_dir / "unlearning.json").write_text(json.dumps({"best": None, "best_reason": "no retain-safe setting"}))
    r = export()
    assert r.exit_code == 2 and "holds no chosen setting (no retain-safe setting)" in r.output and not out.exists()
    (run_dir / "unlearning.json").write_text(json.dumps({"best": {"setting": Setting(top_n=20).to_dict()}}))
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = export()
    assert r.exit_code == 2 and "exists and is not empty" in r.output
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    other = make_run(tmp_path / "other", lm.info.d_model, LAYER, "sha256:another-model", n_candidates=40)
    (other / "unlearning.json").write_text((run_dir / "unlearning.json").read_text())
    r = CliRunner().invoke(main, ["export", "--run", str(other), "--format", "hf", "--model", tiny_model,
                                  str(tmp_path / "export2")])
    assert r.exit_code == 2 and "was trained on model" in r.output and not (tmp_path / "export2").exists()
