"""Modeling code of a FeatureForget model folder (`ff export --format hf`): the base model with
the unlearning edit inside its forward pass. Self-contained (torch and transformers only), so a
folder loads anywhere with

    AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)

The edit is the one `ff generate` and `pipelines.intervene.unlearned` apply (docs/method.md,
"Unlearning at inference"): at the output of block `layer`, the selected SAE features of the
residual stream h (scaled by `scale`) are edited where the gate is open,

    f = relu((scale h - b_dec) W_enc + b_enc)              the selected features only  [S]
    clamp / ablate: h <- h - sum_{i active} (f_i + t_i) W_dec[i] / scale   (t = m act_u, or 0)
    retain_mean:    h <- h - (f - mean_r) W_dec / scale
    project:        h <- h - Q Q^T (scale h - b_dec) / scale   (Q: the decoder rows' span)

The gate ("none", "sequence" or "probe") averages a per-token signal over the editable tokens so
far (or the last `window` of them) and opens above `threshold` once a row has `min_tokens`
editable tokens; BOS and padding (attention mask 0) are never editable. The decision at a
position depends on it and earlier positions only, and KV-cached generation keeps each row's
signal history, so cached generation equals recomputing the whole sequence. Beam search, which
reorders the cache's rows, is refused.

`ff export` writes the run's model class into BASE_CLASS.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

BASE_CLASS = "Gemma3ForCausalLM"


class FeatureForgetEdit(nn.Module):
    """The edit's tensors (buffers saved with the model's weights) and its arithmetic."""

    def __init__(self, spec: dict[str, Any], d_model: int):
        super().__init__()
        self.spec = spec
        S, H = int(spec["n_features"]), int(spec.get("detector_hidden") or 0)
        R = int(spec.get("project_rank") or 0)
        probe = spec["gate"] == "probe"
        for name, shape in (("W_enc", (d_model, S)), ("b_enc", (S,)), ("W_dec", (S, d_model)), ("b_dec", (d_model,)),
                            ("t", (S,)), ("mean_r", (S,)), ("Q", (d_model, R)),
                            ("det_w", ((H or d_model) if probe else 0,)), ("det_W", (H if probe else 0, d_model)),
                            ("det_c", (H if probe else 0,))):
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float32))

    def features(self, h_BTD: Tensor) -> Tensor:
        x_BTD = h_BTD.to(self.W_enc.dtype) * float(self.spec["scale"])
        return torch.relu((x_BTD - self.b_dec) @ self.W_enc + self.b_enc)

    def token_scores(self, g_BTD: Tensor) -> Tensor:
        """The probe's per-token score of the gate layer's output."""
        x = g_BTD.to(self.det_w.dtype) * float(self.spec["gate_scale"])
        if self.det_W.shape[0] == 0:
            return x @ self.det_w
        return F.gelu(x @ self.det_W.T + self.det_c) @ self.det_w

    def gate_open(self, signal_BT: Tensor, editable_BT: Tensor) -> Tensor:
        """bool [B, T]: the causal running mean of the signal over the editable tokens so far (or
        the last `window`), above the threshold, with at least `min_tokens` editable tokens."""
        e_BT = editable_BT.to(torch.float32)
        x_BT = signal_BT.to(torch.float32) * e_BT
        P_BT, E_BT = x_BT.cumsum(1), e_BT.cumsum(1)
        window = self.spec.get("window")
        if window is None:
            share_BT = P_BT / E_BT.clamp_min(1)
        else:
            before_BT = (E_BT - window).clamp_min(0)  # editable tokens that fell out of the window
            j_BT = torch.searchsorted(E_BT.contiguous(), before_BT.contiguous()).clamp_max(x_BT.shape[1] - 1)
            out_BT = torch.where(before_BT > 0, P_BT.gather(1, j_BT), torch.zeros_like(P_BT))
            share_BT = (P_BT - out_BT) / (E_BT - before_BT).clamp_min(1)
        return (share_BT > float(self.spec["threshold"])) & (E_BT >= int(self.spec["min_tokens"]))

    def forward(self, h_BTD: Tensor, editable_BT: Tensor, gate_h_BTD: Tensor | None,
                history: list[Tensor] | None) -> Tensor:
        """The edited h; `history`: [signal, editable] of the row's earlier calls (KV cache),
        extended in place."""
        spec = self.spec
        f_BTS = self.features(h_BTD) * editable_BT[..., None]
        active_BTS = f_BTS > 0
        if spec["gate"] == "none":
            open_BT = torch.ones_like(editable_BT)
        else:
            if spec["gate"] == "probe":
                signal_BT = self.token_scores(h_BTD if gate_h_BTD is None else gate_h_BTD)
            else:
                signal_BT = active_BTS.any(-1).float()
            T = signal_BT.shape[1]
            if history is not None:
                if history:
                    signal_BT = torch.cat([history[0], signal_BT.to(history[0])], 1)
                    editable_all_BT = torch.cat([history[1], editable_BT], 1)
                else:
                    editable_all_BT = editable_BT
                history[:] = [signal_BT, editable_all_BT]
            else:
                editable_all_BT = editable_BT
            open_BT = self.gate_open(signal_BT, editable_all_BT)[:, -T:]
        scale = float(spec["scale"])
        if spec["mode"] in ("retain_mean", "project"):
            open_BT = open_BT & editable_BT
            if spec["mode"] == "retain_mean":
                delta_BTD = ((f_BTS - self.mean_r) @ self.W_dec) / scale
            else:
                x_BTD = h_BTD.to(self.Q.dtype) * scale - self.b_dec
                delta_BTD = ((x_BTD @ self.Q) @ self.Q.T) / scale
            return h_BTD - (delta_BTD * open_BT[..., None]).to(h_BTD.dtype)
        active_BTS = active_BTS & open_BT[..., None]
        t_BTS = -self.t * active_BTS
        delta_BTD = (((f_BTS * active_BTS) - t_BTS) @ self.W_dec) / scale
        return h_BTD - delta_BTD.to(h_BTD.dtype)


def _continues(kwargs: dict[str, Any]) -> bool:
    """Whether a forward continues a KV-cached sequence (its first position is not 0)."""
    for key in ("cache_position", "position_ids"):
        pos = kwargs.get(key)
        if isinstance(pos, Tensor) and pos.numel():
            return int(pos.reshape(-1)[0]) > 0
    cache = kwargs.get("past_key_values")
    return bool(cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0)


def _output(out: Any) -> Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


class FeatureForgetForCausalLM(getattr(transformers, BASE_CLASS)):
    """The base model with the edit at the output of block `featureforget["layer"]`."""

    def __init__(self, config):
        super().__init__(config)
        spec = dict(config.featureforget)
        self.featureforget = FeatureForgetEdit(spec, int(config.hidden_size))
        self._ff_state: dict[str, Any] = {"editable": None, "gate_h": None, "history": []}
        layers = self.model.layers
        layer, gate_layer = int(spec["layer"]), int(spec.get("gate_layer", spec["layer"]))
        self.model.register_forward_pre_hook(self._ff_begin, with_kwargs=True)
        if spec["gate"] == "probe" and gate_layer != layer:
            layers[gate_layer].register_forward_hook(self._ff_keep_gate_input)
        layers[layer].register_forward_hook(self._ff_edit)

    def generate(self, *args, **kwargs):
        """The base class's generate; beam search is refused (it reorders the rows of the cache,
        which the gate's per-row history does not follow)."""
        config = kwargs.get("generation_config") or self.generation_config
        beams = kwargs.get("num_beams") or getattr(config, "num_beams", 1) or 1
        if beams > 1:
            raise ValueError("FeatureForget's gate keeps each row's history in order and beam search reorders "
                             "rows: use greedy decoding or sampling (num_beams=1)")
        return super().generate(*args, **kwargs)

    def _ff_begin(self, _module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        bos = self.featureforget.spec.get("bos_token_id")
        state = self._ff_state
        if isinstance(ids, Tensor):
            editable = ids != bos if bos is not None else torch.ones_like(ids, dtype=torch.bool)
            if isinstance(mask, Tensor) and mask.dim() == 2:
                editable = editable & mask[:, -ids.shape[1]:].bool()
            state["editable"] = editable
        else:
            state["editable"] = None
        if not _continues(kwargs):
            state["history"] = []  # a new sequence: the gate starts counting afresh

    def _ff_keep_gate_input(self, _module, _inputs, output):
        self._ff_state["gate_h"] = _output(output)

    def _ff_edit(self, _module, _inputs, output):
        h_BTD = _output(output)
        state = self._ff_state
        editable = state["editable"]
        if editable is None or editable.shape != h_BTD.shape[:2]:
            editable = torch.ones(h_BTD.shape[:2], dtype=torch.bool, device=h_BTD.device)
        gate_h, state["gate_h"] = state["gate_h"], None
        new = self.featureforget(h_BTD, editable.to(h_BTD.device), gate_h, state["history"])
        return (new, *output[1:]) if isinstance(output, (tuple, list)) else new
