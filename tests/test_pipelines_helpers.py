"""Shared helpers for the pipelines tests: a hand-made run folder (random SAE + features).

No tests here; the other test_pipelines_* modules import `make_run`.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch


def make_run(path: Path, d_model: int, layer: int, model_hash: str, *, d_sae: int | None = None,
             method: str = "featureforget", n_candidates: int = 12, scale: float = 0.5, seed: int = 0,
             b_enc: float = -0.3, model: str = "tiny", probe_layer: int | None = None,
             mlp_probe: bool = False) -> Path:
    """Write RUN/{sae.safetensors, features.safetensors, config.json} like `ff train` does.
    `probe_layer`: the probe reads that block's output (`ff train --set probe_offset=K`); `mlp_probe`:
    the run also has a (random) "mlp" detector."""
    from safetensors.torch import save_file

    from trainer.sae import SAE

    path.mkdir(parents=True, exist_ok=True)
    d_sae = d_sae or 8 * d_model
    g = torch.Generator().manual_seed(seed)
    sae = SAE(d_model, d_sae, generator=g)
    with torch.no_grad():
        sae.b_enc.copy_(b_enc * torch.rand(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d_model, generator=g))
    sae.save(path / "sae.safetensors")
    cand = torch.zeros(d_sae, dtype=torch.bool)
    cand[torch.randperm(d_sae, generator=g)[:n_candidates]] = True
    feats = {"alpha_r": torch.rand(d_sae, generator=g), "alpha_u": torch.rand(d_sae, generator=g),
             "freq_r": torch.rand(d_sae, generator=g) * 0.02, "freq_u": torch.rand(d_sae, generator=g) * 0.1,
             "cluster": torch.randint(0, 4, (d_sae,), generator=g), "candidate": cand}
    for k in ("mean", "mean_sq", "act"):
        for c in ("r", "u"):
            feats[f"{k}_{c}"] = torch.rand(d_sae, generator=g)
    save_file(feats, str(path / "features.safetensors"))
    write_gate(path, feats, method, g, d_model, mlp_probe=mlp_probe)
    if probe_layer is not None:
        from safetensors.torch import load_file

        gate = load_file(str(path / "gate.safetensors"))
        gate.update({"probe/layer": torch.tensor([probe_layer]), "probe/scale": torch.tensor([0.8])})
        save_file(gate, str(path / "gate.safetensors"))
    cfg = {"method": method, "layer": layer, "model": model, "model_hash": model_hash,
           "d_model": d_model, "d_sae": d_sae, "scale": scale, "ctx_len": 32}
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def write_gate(path: Path, feats: dict, method: str, g: torch.Generator, d_model: int, share: float = 0.1,
               mlp_probe: bool = False) -> None:
    """RUN/gate.safetensors for every selection `ff train` calibrates, with retain shares drawn
    uniformly in [0, share) over 40 contexts, and a random probe (`mlp_probe`: and a random
    "mlp" detector of 8 hidden units)."""
    from safetensors.torch import save_file

    from trainer.gate.calibrate import calibration_sets

    sets = calibration_sets(feats, method)
    gate = {f"{k}/features": v for k, v in sets.items()}
    gate.update({f"{k}/share": torch.rand(40, generator=g) * share for k in sets})
    # the probe gate's detector (trainer/gate/detector.py), random
    gate.update({"probe/w": torch.randn(d_model, generator=g), "probe/b": torch.tensor([-0.5]),
                 "probe/max": torch.randn(40, generator=g)})
    if mlp_probe:
        gate.update({"probe@mlp/W": torch.randn(8, d_model, generator=g), "probe@mlp/c": torch.randn(8, generator=g),
                     "probe@mlp/w": torch.randn(8, generator=g), "probe@mlp/b": torch.tensor([0.3]),
                     "probe@mlp/max": torch.randn(40, generator=g)})
    save_file(gate, str(path / "gate.safetensors"))


def set_encoder_bias(run: Path, values: dict[int, float]) -> None:
    """Overwrite b_enc[i] for the given features (e.g. -1e4 to make a feature never fire)."""
    from safetensors.torch import load_file, save_file

    t = load_file(str(run / "sae.safetensors"))
    for i, v in values.items():
        t["b_enc"][i] = v
    save_file(t, str(run / "sae.safetensors"))


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny-model ops are far slower with 2 OpenMP threads on a busy 2-core machine (spin waits
    on each ~1 ms matmul); modules that import this fixture run with one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
