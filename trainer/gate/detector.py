"""The topic detector behind the probe gate: a logistic regression on the residual stream.

The sequence gate (`trainer/gate/`) counts the tokens on which any *selected* feature
fires. On short prompts (a question is 10-30 tokens) that count is too coarse to tell the
topics apart: the features chosen to be edited are chosen for what they *carry*, not for how
well they *detect*. The probe gate reads the layer's whole (normalised) residual stream:

    xbar_t  = (1 / n_t) sum_{s <= t} x_s           mean of the editable tokens so far  [D]
    score_t = w . xbar_t + b                        log-odds that the sequence is unlearn text

Because the score is linear in the running mean it is causal and cheap: a token contributes
the scalar `x_s . w` once, and the gate keeps a running sum, exactly like the firing share of
the sequence gate (KV-cached generation carries the two sums). An earlier version read the
SAE's feature firing instead; on the demo the residual stream detects the topic better, on
question prompts and on prose (docs/method.md, "The probe gate"). Both methods' runs at one layer
thus share one kind of detector, and their comparison is about the features they edit.

Training (`ff train`, from the store, no LLM): examples are windows of the training contexts
of both corpora, labelled unlearn = 1 and retain = 0: per context and per length in
`PROBE_LENGTHS`, the prefix and `PROBE_STARTS` windows at seeded random starts (so that a short
prompt, which starts at its first token, looks like data the probe has seen wherever a topic
begins), and the whole context. The dimensions are standardised and the weights
L2-regularised (full-batch L-BFGS, balanced classes). Calibration: the threshold is a
percentile, over retain training contexts, of the context's highest score at any position with
at least `GATE_MIN_TOKENS` editable tokens, scored by a probe that did not see the context (two
folds, cross-fitted), so that at the 95th percentile the gate opens somewhere in about 5% of
unseen retain contexts. The stored probe averages the two folds' weights.

Kinds (`PROBE_KINDS`): the "linear" detector above, and an "mlp" detector whose per-token score
is a small network, `s(x_s) = w . gelu(W x_s + c)`, pooled like the linear one
(`score_t = mean_{s <= t} s(x_s) + b`). Still a running mean of one scalar per token, so just as
causal and cheap to carry across KV-cached steps, but a token's evidence may depend on its
features jointly. It is trained on the same kinds of windows by gradient descent on the pooled
score (AdamW, balanced classes), one network per fold; the stored detector is the two folds'
networks side by side (the mean of their scores), and each retain context is calibrated by the
fold's network that did not see it.

Shape suffixes: C contexts, T positions, D d_model, H hidden units, N examples.
"""
from __future__ import annotations

from typing import Callable, Iterable, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.gate import GATE_MIN_TOKENS, PROBE_KINDS  # noqa: F401 (PROBE_KINDS: the kinds fitted here)
from trainer.gate.causal import firing_share

Contexts = Iterable[tuple[Tensor, Tensor]]
"""(x [C, T, D] normalised, editable [C, T]) per piece of a corpus."""

PROBE_LENGTHS = (8, 12, 16, 24, 32, 48, 64, 96)
"""Window lengths (editable tokens) of the training examples, besides the whole context."""
PROBE_STARTS = 3
"""Windows per length and context at random starts, besides the prefix."""
PROBE_L2 = 1e-1
"""L2 penalty on the standardised weights (mean logistic loss + PROBE_L2 * ||w||^2) of the
run's default probe (gate.safetensors keys "probe/...")."""
PROBE_L2S = (PROBE_L2, 1e-2, 1e-3)
"""Penalties `ff train` fits a probe for (the others under "probe@<l2>/..."): which detects
prompts best depends on the layer and the data, so `ff eval` chooses on the dev questions."""
PROBE_MAX_CONTEXTS = 2048
"""At most this many contexts per corpus feed the probe (evenly spaced); the rest add little."""

PROBE_MLP_HIDDEN = 64
"""Hidden units of each fold's network ("mlp" detector; the stored one has twice as many)."""
PROBE_MLP_STEPS = 400
"""AdamW steps per fold's network."""
PROBE_MLP_BATCH = 32
"""Contexts per corpus per step, each giving `PROBE_MLP_WINDOWS` windows."""
PROBE_MLP_WINDOWS = 12
PROBE_MLP_LR = 3e-3
PROBE_MLP_WD = 1e-3


class Detector(NamedTuple):
    """A per-token scorer whose running mean plus `b` is the detector's score: linear,
    `x . w` (W_HD None), or a one-hidden-layer network, `w . gelu(W x + c)` (w then [H])."""
    w: Tensor
    b: float
    W_HD: Tensor | None = None
    c_H: Tensor | None = None

    @property
    def kind(self) -> str:
        return "linear" if self.W_HD is None else "mlp"

    def token_scores(self, x_BTD: Tensor) -> Tensor:
        """Each token's score [B, T] (the gate averages it over the tokens so far)."""
        x = x_BTD.to(self.w.dtype)
        if self.W_HD is None:
            return x @ self.w
        return F.gelu(x @ self.W_HD.T + self.c_H) @ self.w

    def to(self, device) -> "Detector":
        def move(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(device=device, dtype=torch.float32)
        return Detector(move(self.w), self.b, move(self.W_HD), move(self.c_H))


class Probe(NamedTuple):
    detector: Detector
    retain_max_C: Tensor
    """Per retain training context: its highest out-of-fold score (the gate's calibration)."""

    @property
    def w_D(self) -> Tensor:
        """Linear detector: weights on the running mean of the normalised residual stream."""
        return self.detector.w

    @property
    def b(self) -> float:
        """Bias (log-odds)."""
        return self.detector.b


def _kept(contexts: Contexts, keep_every: int) -> Iterable[tuple[Tensor, Tensor]]:
    """(x [T, D] float32, editable [T]) of every `keep_every`-th context, in reading order."""
    c = 0
    for x_CTD, m_CT in contexts:
        for x_TD, m_T in zip(x_CTD, m_CT):
            c += 1
            if (c - 1) % keep_every == 0:
                yield x_TD.float(), m_T.bool()


@torch.no_grad()
def _windows(contexts: Contexts, keep_every: int, lengths: tuple[int, ...], starts: int,
             g: torch.Generator, keep: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
    """(window means [N, D], context index [N]) of the kept contexts (appended to `keep`,
    in half precision, when given)."""
    means, ctx_ids = [], []
    for c, (x_TD, m_T) in enumerate(_kept(contexts, keep_every)):
        if keep is not None:
            keep.append((x_TD.half(), m_T))
        cum_TD = torch.cat([x_TD.new_zeros(1, x_TD.shape[1]), (x_TD * m_T[:, None]).cumsum(0)])
        seen_T = torch.cat([torch.zeros(1), m_T.float().cumsum(0)])
        n, T = float(seen_T[-1]), len(m_T)
        if n == 0:
            continue
        for L in lengths:
            if L >= T:
                continue
            for s in [0, *torch.randint(1, T - L + 1, (starts,), generator=g).tolist()]:
                k = float(seen_T[s + L] - seen_T[s])
                if k >= min(L, GATE_MIN_TOKENS) // 2:  # windows over mostly padding add nothing
                    means.append((cum_TD[s + L] - cum_TD[s]) / k)
                    ctx_ids.append(c)
        means.append(cum_TD[-1] / n)
        ctx_ids.append(c)
    D = means[0].shape[0] if means else 0
    return (torch.stack(means) if means else torch.zeros(0, D)), torch.tensor(ctx_ids, dtype=torch.long)


def _fit(x_NF: Tensor, y_N: Tensor, l2: float) -> tuple[Tensor, float]:
    """Logistic regression on standardised features -> (w in raw units [F], b)."""
    mu_F, sd_F = x_NF.mean(0), x_NF.std(0)
    live_F = sd_F > 0
    z_NF = (x_NF - mu_F) / torch.where(live_F, sd_F, torch.ones_like(sd_F))
    z_NF[:, ~live_F] = 0
    w_F = torch.zeros(x_NF.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w_F, b], max_iter=200, history_size=20, line_search_fn="strong_wolfe")
    pos = float(y_N.mean())
    weight_N = torch.where(y_N > 0, 0.5 / max(pos, 1e-6), 0.5 / max(1 - pos, 1e-6))  # balanced

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(z_NF @ w_F + b, y_N, weight=weight_N)
        loss = loss + l2 * w_F.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w_raw_F = torch.where(live_F, w_F.detach() / torch.where(live_F, sd_F, torch.ones_like(sd_F)), 0.0)
    return w_raw_F, float(b.detach() - (w_raw_F * mu_F).sum())


def _stack(ctxs: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
    """Contexts -> (x [C, T, D], editable [C, T]), shorter ones padded (not editable)."""
    T = max(len(m) for _, m in ctxs)
    x = torch.zeros(len(ctxs), T, ctxs[0][0].shape[1], dtype=ctxs[0][0].dtype)
    m = torch.zeros(len(ctxs), T, dtype=torch.bool)
    for i, (x_TD, m_T) in enumerate(ctxs):
        x[i, :len(m_T)], m[i, :len(m_T)] = x_TD, m_T
    return x, m


def _window_means(s_CT: Tensor, m_CT: Tensor, lengths: Tensor, per: int, g: torch.Generator) -> Tensor:
    """Mean token score of `per` windows per context: lengths drawn from `lengths` and the whole
    context, a quarter of them prefixes, the rest at random starts; windows over mostly padding
    dropped (as in `_windows`)."""
    C, T = s_CT.shape
    cs = torch.cat([s_CT.new_zeros(C, 1), (s_CT * m_CT).cumsum(1)], 1)
    cn = torch.cat([torch.zeros(C, 1), m_CT.float().cumsum(1)], 1)
    all_L = torch.cat([lengths[lengths < T], torch.tensor([T])])
    L = all_L[torch.randint(0, len(all_L), (C, per), generator=g)]
    start = (torch.rand(C, per, generator=g) * (T - L + 1)).long().clamp(max=T - L)
    start = torch.where(torch.rand(C, per, generator=g) < 0.25, 0, start)
    c = torch.arange(C)[:, None].expand(C, per)
    k = cn[c, start + L] - cn[c, start]
    ok = k >= (L.clamp(max=GATE_MIN_TOKENS) // 2).clamp_min(1)
    return ((cs[c, start + L] - cs[c, start]) / k.clamp_min(1))[ok]


def _fit_mlp(retain: list[tuple[Tensor, Tensor]], unlearn: list[tuple[Tensor, Tensor]], lengths: tuple[int, ...],
             g: torch.Generator, hidden: int = PROBE_MLP_HIDDEN, steps: int = PROBE_MLP_STEPS,
             batch: int = PROBE_MLP_BATCH) -> Detector:
    """One network on the contexts of both corpora (module docstring), the standardisation
    folded into its first layer."""
    x_r, m_r = _stack(retain)
    x_u, m_u = _stack(unlearn)
    tok = torch.cat([x_r[m_r], x_u[m_u]]).float()
    mu_D, sd_D = tok.mean(0), tok.std(0)
    del tok
    sd_D = torch.where(sd_D > 0, sd_D, torch.ones_like(sd_D))
    D = x_r.shape[-1]
    W = ((torch.rand(hidden, D, generator=g) * 2 - 1) / D ** 0.5).requires_grad_()
    c = torch.zeros(hidden, requires_grad=True)
    w = ((torch.rand(hidden, generator=g) * 2 - 1) / hidden ** 0.5).requires_grad_()
    b = torch.zeros(1, requires_grad=True)
    opt = torch.optim.AdamW([W, c, w, b], lr=PROBE_MLP_LR, weight_decay=PROBE_MLP_WD)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    L = torch.tensor(lengths, dtype=torch.long)
    for _ in range(steps):
        loss = torch.zeros(())
        for x, m, label in ((x_r, m_r, 0.0), (x_u, m_u, 1.0)):  # balanced classes
            i = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
            z = (x[i].float() - mu_D) / sd_D
            logit = _window_means(F.gelu(z @ W.T + c) @ w, m[i], L, PROBE_MLP_WINDOWS, g) + b
            loss = loss + 0.5 * F.binary_cross_entropy_with_logits(logit, torch.full_like(logit, label))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        W_raw = W / sd_D
        return Detector(w.detach().clone(), float(b), W_raw.detach(), (c - W_raw @ mu_D).detach())


def _side_by_side(a: Detector, b: Detector) -> Detector:
    """The network whose token score is the mean of two networks' (their hidden units side by side)."""
    return Detector(torch.cat([a.w, b.w]) / 2, (a.b + b.b) / 2, torch.cat([a.W_HD, b.W_HD]),
                    torch.cat([a.c_H, b.c_H]))


@torch.no_grad()
def max_score(x_TD: Tensor, m_T: Tensor, w_D: "Tensor | Detector", b: float,
              min_tokens: int = GATE_MIN_TOKENS) -> Tensor:
    """A context's highest causal score at any position with >= min_tokens editable tokens (a
    shorter context: its whole-context score; none editable: -inf), under the linear weights
    `w_D` or a `Detector`."""
    if not bool(m_T.any()):
        return torch.tensor(float("-inf"))
    share_1T, seen_1T = firing_share(token_scores(x_TD[None], w_D), m_T[None])  # the gate's running mean
    ok_T = (seen_1T[0] >= min(min_tokens, float(seen_1T[0, -1]))) & m_T
    return share_1T[0][ok_T].max() + b


def fit_probe(retain: Callable[[], Contexts], unlearn: Contexts, *, n_retain: int, n_unlearn: int,
              lengths: tuple[int, ...] = PROBE_LENGTHS, starts: int = PROBE_STARTS,
              l2: float = PROBE_L2, max_contexts: int = PROBE_MAX_CONTEXTS, seed: int = 0) -> Probe:
    """Fit the detector on the contexts of each corpus (`retain()` is read twice: to fit, then
    to calibrate; `n_*`: how many contexts each yields) and calibrate it on retain contexts."""
    return fit_probes(retain, unlearn, n_retain=n_retain, n_unlearn=n_unlearn, lengths=lengths, starts=starts,
                      l2s=(l2,), max_contexts=max_contexts, seed=seed)[l2]


def fit_probes(retain: Callable[[], Contexts], unlearn: Contexts, *, n_retain: int, n_unlearn: int,
               lengths: tuple[int, ...] = PROBE_LENGTHS, starts: int = PROBE_STARTS,
               l2s: tuple[float, ...] = PROBE_L2S, max_contexts: int = PROBE_MAX_CONTEXTS,
               mlp: bool = False, seed: int = 0) -> dict[float | str, Probe]:
    """`fit_probe` for each L2 penalty in `l2s`, on the same windows and calibration pass, and
    with `mlp` the "mlp" detector (key "mlp") on the same contexts and folds."""
    keep_r, keep_u = max(1, -(-n_retain // max_contexts)), max(1, -(-n_unlearn // max_contexts))
    g = torch.Generator().manual_seed(seed)
    kept: dict[str, list[tuple[Tensor, Tensor]]] = {"r": [], "u": []}
    x_r, ctx_r = _windows(retain(), keep_r, lengths, starts, g, kept["r"] if mlp else None)
    x_u, ctx_u = _windows(unlearn, keep_u, lengths, starts, g, kept["u"] if mlp else None)
    if len(x_r) == 0 or len(x_u) == 0:
        raise ValueError("the probe needs contexts with editable tokens in both corpora")
    x_ND = torch.cat([x_r, x_u])
    y_N = torch.cat([torch.zeros(len(x_r)), torch.ones(len(x_u))])
    fold_N = torch.cat([ctx_r % 2, ctx_u % 2])
    del x_r, x_u
    fits: dict[float | str, list[Detector]] = {
        l2: [Detector(*_fit(x_ND[fold_N != k], y_N[fold_N != k], l2)) for k in (0, 1)] for l2 in l2s}
    del x_ND
    if mlp:  # each fold's network on the other fold's contexts, like the linear fits

        def fold(ctxs: list[tuple[Tensor, Tensor]], k: int) -> list[tuple[Tensor, Tensor]]:
            return [c for i, c in enumerate(ctxs) if i % 2 != k] or ctxs

        fits["mlp"] = [_fit_mlp(fold(kept["r"], k), fold(kept["u"], k), lengths, g) for k in (0, 1)]
    del kept
    # cross-fitting: each retain context is scored by the probe that did not see it
    oof: dict[float | str, list[Tensor]] = {key: [] for key in fits}
    for c, (x_TD, m_T) in enumerate(_kept(retain(), keep_r)):
        for key in oof:
            det = fits[key][c % 2]
            oof[key].append(max_score(x_TD, m_T, det, det.b))

    def stacked(key: float | str) -> Tensor:
        return torch.stack(oof[key]) if oof[key] else torch.zeros(0)

    def joined(key: float | str) -> Detector:
        a, b = fits[key]
        if a.W_HD is not None:
            return _side_by_side(a, b)
        return Detector((a.w + b.w) / 2, (a.b + b.b) / 2)

    return {key: Probe(joined(key), stacked(key)) for key in fits}


def token_scores(x_BTD: Tensor, w_D: "Tensor | Detector") -> Tensor:
    """Each token's contribution [B, T] (the gate averages it over the prefix): x . w for the
    linear weights `w_D`, or a `Detector`'s token score."""
    if isinstance(w_D, Detector):
        return w_D.token_scores(x_BTD)
    return x_BTD.to(w_D.dtype) @ w_D
