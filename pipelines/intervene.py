"""Unlearning at inference (METHOD §7): edit the residual stream at the output of block `layer`.

    h <- h - sum_{i in S} (f_i(h) - t_i(h)) * W_dec[i] / scale

`ablate`: t = 0; `clamp`: t = -m wherever f_i > 0. Everything else, the SAE's reconstruction
error included, passes unchanged, so a token on which no selected feature fires is left exactly
as it was. Only the encoder columns of S are kept (W_enc[:, S]), so the edit costs d x |S|.
Two reference modes for CE loss (METHOD §8): `splice` (h <- SAE reconstruction) and `zero`.

BOS positions are never edited: the SAE never saw them in training (METHOD §0) and their
activations are ~10x outliers that the model uses as an attention sink.

    with unlearned(model, "runs/l8", mode="clamp", multiplier=50, top_n=20):
        model.generate(...)

Shape suffixes: B batch, T tokens, D d_model, S selected features.
"""
from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import torch
from torch import Tensor

from cache.models import decoder_layers
from pipelines.errors import EvalError
from pipelines.config import Setting
from trainer.evaluate import saebench_select
from trainer.sae import SAE

FEATURE_KEYS = ("alpha_r", "alpha_u", "freq_r", "freq_u", "candidate")


class LoadedRun(NamedTuple):
    path: Path
    sae: SAE
    scale: float
    """The SAE works on h * scale (METHOD §0)."""
    config: dict[str, Any]
    features: dict[str, Tensor]
    """features.safetensors: alpha_r, alpha_u, freq_r, freq_u [F] float, candidate [F] bool, ..."""
    layer: int
    method: str


class Edited(NamedTuple):
    h_BTD: Tensor
    changed_BT: Tensor
    """bool [B, T]: positions that were edited (the others are bit-identical)."""

    @property
    def changed_B(self) -> Tensor:
        return self.changed_BT.any(1)


def load_run(run_dir: str | Path) -> LoadedRun:
    """Read a run folder (docs/architecture.md); a missing or inconsistent file is an EvalError."""
    from safetensors.torch import load_file

    path = Path(run_dir)
    for name in ("config.json", "sae.safetensors", "features.safetensors"):
        if not (path / name).is_file():
            raise EvalError(f"{path} has no {name}: not a finished run folder (train it with ff train --out {path})")
    try:
        sae, scale, config = SAE.from_run(path)
    except (ValueError, KeyError) as e:
        raise EvalError(f"cannot load the SAE of {path}: {e}") from e
    feats = load_file(str(path / "features.safetensors"))
    for key in FEATURE_KEYS:
        if key not in feats or feats[key].shape != (sae.d_sae,):
            raise EvalError(f"{path}/features.safetensors: '{key}' is missing or not of shape [{sae.d_sae}]")
    if "layer" not in config:
        raise EvalError(f"{path}/config.json has no 'layer'")
    feats["candidate"] = feats["candidate"].bool()
    method = str(config.get("method", "featureforget"))
    return LoadedRun(path, sae.eval(), scale, config, feats, int(config["layer"]), method)


def select_features(run: LoadedRun, setting: Setting) -> Tensor:
    """The feature set S of a setting, as sorted indices [S] (METHOD §7)."""
    f = run.features
    if setting.selection == "saebench":
        mask_F = saebench_select(f["freq_r"].float(), f["freq_u"].float(), setting.top_n or 20,
                                 setting.freq_threshold)
        return mask_F.nonzero().flatten()
    idx_S = f["candidate"].nonzero().flatten()
    if setting.top_n is not None and len(idx_S) > setting.top_n:
        ratio_S = f["alpha_u"][idx_S].double() / (f["alpha_r"][idx_S].double() + 1e-12)
        idx_S = idx_S[torch.argsort(ratio_S, descending=True, stable=True)[: setting.top_n]]
    return idx_S.sort().values


class Intervention:
    """One setting applied to one run; reusable across many forwards and evaluations."""

    def __init__(self, run: LoadedRun, setting: Setting):
        self.layer, self.setting, self.scale = run.layer, setting, run.scale
        self.d_model = run.sae.d_model
        sae = run.sae
        self.features = select_features(run, setting) if setting.edits_features else torch.arange(0)
        with torch.no_grad():
            self.W_enc_DS = sae.W_enc[:, self.features].detach().clone()
            self.b_enc_S = sae.b_enc[self.features].detach().clone()
            self.W_dec_SD = sae.W_dec[self.features].detach().clone()
            self.b_dec_D = sae.b_dec.detach().clone()
        self.sae = sae if setting.mode == "splice" else None

    @property
    def n_features(self) -> int:
        return len(self.features)

    def to(self, device: Any) -> "Intervention":
        for name in ("W_enc_DS", "b_enc_S", "W_dec_SD", "b_dec_D"):
            setattr(self, name, getattr(self, name).to(device))
        if self.sae is not None:
            self.sae = self.sae.to(device)
        return self

    @torch.no_grad()
    def selected_acts(self, h_BTD: Tensor) -> Tensor:
        """f_S(h) [B, T, S]: activations of the selected features only."""
        x_BTD = h_BTD.to(self.W_enc_DS.dtype) * self.scale
        return torch.relu((x_BTD - self.b_dec_D) @ self.W_enc_DS + self.b_enc_S)

    @torch.no_grad()
    def edit(self, h_BTD: Tensor, editable_BT: Tensor | None = None) -> Edited:
        """Apply the setting to h [B, T, D]; positions where editable_BT is False are kept."""
        if editable_BT is None:
            editable_BT = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
        mode = self.setting.mode
        if mode == "zero":
            return Edited(torch.where(editable_BT[..., None], 0.0, h_BTD).to(h_BTD.dtype), editable_BT)
        if mode == "splice":
            x_hat_BTD = self.sae(h_BTD.to(self.b_dec_D.dtype) * self.scale).x_hat / self.scale
            return Edited(torch.where(editable_BT[..., None], x_hat_BTD.to(h_BTD.dtype), h_BTD), editable_BT)
        f_BTS = self.selected_acts(h_BTD) * editable_BT[..., None]
        active_BTS = f_BTS > 0
        # clamp: t = -m where f > 0 (SAEBench); ablate: t = 0. Inactive features: f - t = 0.
        t_BTS = -self.setting.multiplier * active_BTS if mode == "clamp" else torch.zeros_like(f_BTS)
        delta_BTD = ((f_BTS - t_BTS) @ self.W_dec_SD) / self.scale
        return Edited(h_BTD - delta_BTD.to(h_BTD.dtype), active_BTS.any(-1))

    def attach(self, model: Any, *, skip_bos: bool = True) -> "Hooks":
        """Install the edit on `model` (forward hook on block `layer`); call .remove() to undo."""
        blocks = decoder_layers(model)
        cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        if not 0 <= self.layer < len(blocks):
            raise EvalError(f"the run edits layer {self.layer} but the model has {len(blocks)} layers")
        if int(cfg.hidden_size) != self.d_model:
            raise EvalError(f"the run's SAE has d_model {self.d_model} but the model has hidden size "
                            f"{cfg.hidden_size}: it was trained on another model")
        bos = getattr(cfg, "bos_token_id", None) if skip_bos else None
        state: dict[str, Tensor | None] = {"editable": None}

        def pre_hook(_module, args, kwargs):
            ids = kwargs.get("input_ids", args[0] if args else None)
            state["editable"] = (ids != bos) if (bos is not None and isinstance(ids, Tensor)) else None

        def hook(_module, _inputs, output):
            h_BTD = output[0] if isinstance(output, (tuple, list)) else output
            editable_BT = state["editable"]
            if editable_BT is not None and editable_BT.shape != h_BTD.shape[:2]:
                editable_BT = None
            new_BTD = self.to(h_BTD.device).edit(h_BTD, editable_BT).h_BTD
            return (new_BTD, *output[1:]) if isinstance(output, (tuple, list)) else new_BTD

        base = getattr(model, "model", model)
        return Hooks([base.register_forward_pre_hook(pre_hook, with_kwargs=True),
                      blocks[self.layer].register_forward_hook(hook)])

    @contextmanager
    def hooked(self, model: Any, *, skip_bos: bool = True) -> Iterator["Intervention"]:
        hooks = self.attach(model, skip_bos=skip_bos)
        try:
            yield self
        finally:
            hooks.remove()


class Hooks:
    """The handles installed by `Intervention.attach`; `remove()` restores the clean model."""

    def __init__(self, handles: list[Any]):
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@contextmanager
def unlearned(model: Any, run_dir: str | Path | LoadedRun, *, mode: str = "clamp",
              multiplier: float = 50.0, top_n: int | None = None, selection: str | None = None,
              freq_threshold: float = 0.01, skip_bos: bool = True) -> Iterator[Intervention]:
    """Context manager: `model` with the run's features edited (METHOD §7); clean again on exit.

    `selection` defaults to "candidates" for FeatureForget runs and "saebench" for baseline runs.
    """
    run = run_dir if isinstance(run_dir, LoadedRun) else load_run(run_dir)
    if selection is None:
        selection = "saebench" if run.method == "baseline" else "candidates"
    setting = Setting(mode=mode, multiplier=multiplier, top_n=top_n, selection=selection,
                      freq_threshold=freq_threshold)
    with Intervention(run, setting).hooked(model, skip_bos=skip_bos) as iv:
        yield iv
