"""Scores, intervals and the choice of the best setting (METHOD §8), on per-question results.

No model here: everything works on bool [Q] correctness vectors and per-row scores, so it is
tested against known cases.

- `unlearning_score`: SAEBench's 1 - acc_after / acc_before on the forget questions.
- `bootstrap_ci`: a percentile bootstrap over questions (paired before/after), seeded.
- `paired_difference`: one method's score minus another's on the same questions, with a
  bootstrap that resamples the questions once for both.
- `half`: one half (dev or test) of a sweep entry: accuracies, score, interval, and the score on
  the questions the clean model answers correctly (SAEBench protocol: there acc_before = 1).
- `pick_best`: the highest dev score among retain-safe settings; None with a reason otherwise
  (`why_unsafe`: why one setting is not retain-safe); these read typed entries (pipelines/result.py).
- `gate_split`: the forget questions on which the gate opened vs stayed shut, and the score's
  ceiling under that gate (every opened question answered at chance, the shut ones as before).
- `auroc`: how well a per-sequence score separates forget from retain sequences.
- `verdict`: "beats" only when two intervals do not overlap, else "within noise".
"""
from __future__ import annotations

import torch
from torch import Tensor

from pipelines.result import Answers, Entry, Half, Pair, Part, Split, SplitSide


def unlearning_score(before: float, after: float) -> float | None:
    """SAEBench: 1 - acc_after / acc_before on forget questions; None when acc_before is 0."""
    return 1.0 - after / before if before > 0 else None


def bootstrap_ci(before_Q: Tensor, after_Q: Tensor, *, n: int = 2000, seed: int = 0,
                 level: float = 0.95) -> list[float] | None:
    """Percentile bootstrap interval of the unlearning score, resampling questions (paired)."""
    Q = len(before_Q)
    if Q == 0 or n < 1:
        return None
    idx_NQ = _resampled(Q, n, seed)
    b_N = before_Q.double()[idx_NQ].mean(1)
    a_N = after_Q.double()[idx_NQ].mean(1)
    ok = b_N > 0
    if not bool(ok.any()):
        return None
    return _interval(1 - a_N[ok] / b_N[ok], level)


def _resampled(Q: int, n: int, seed: int) -> Tensor:
    """n bootstrap resamples of Q questions' indices [n, Q], seeded."""
    return torch.randint(0, Q, (n, Q), generator=torch.Generator().manual_seed(seed))


def _interval(x_N: Tensor, level: float) -> list[float]:
    """The central `level` percentile interval of bootstrap values."""
    lo, hi = torch.quantile(x_N, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return [float(lo), float(hi)]


def _acc(x_Q: Tensor) -> float:
    return float(x_Q.double().mean()) if len(x_Q) else float("nan")


def half(forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor], mask_Q: Tensor,
         retain_mask_Q: Tensor, *, bootstrap: int = 0, seed: int = 0) -> Half:
    """One half of an entry. `forget` / `retain` = (correct before [Q], correct after [Q]);
    the masks pick the half's questions in each file. With `bootstrap` resamples, the score's
    interval and the per-question answers too (a chosen setting's halves)."""
    fb, fa = forget[0][mask_Q], forget[1][mask_Q]
    rb, ra = retain[0][retain_mask_Q], retain[1][retain_mask_Q]
    known = fb.bool()
    out = Half.build(questions=int(mask_Q.sum()), forget_mcq=Pair.build(before=_acc(fb), after=_acc(fa)),
                     retain_mcq=Pair.build(before=_acc(rb), after=_acc(ra)),
                     unlearning_score=unlearning_score(_acc(fb), _acc(fa)),
                     correct_subset_score=1.0 - _acc(fa[known]) if bool(known.any()) else None)
    if bootstrap:
        out = out.updated(ci95=bootstrap_ci(fb, fa, n=bootstrap, seed=seed),
                          forget_correct=Answers.build(before=bits(fb), after=bits(fa)))
    return out


def bits(x_Q: Tensor) -> str:
    """Per-question correctness as a string of 0/1, in file order (compact in JSON)."""
    return "".join("1" if bool(v) else "0" for v in x_Q.tolist())


def unbits(s: str) -> Tensor:
    return torch.tensor([c == "1" for c in s], dtype=torch.bool)


def paired_difference(before_Q: Tensor, after_a_Q: Tensor, after_b_Q: Tensor, *, n: int = 2000, seed: int = 0,
                      level: float = 0.95) -> tuple[float, list[float]] | None:
    """Score of A minus score of B on the same questions (same clean answers), with a percentile
    bootstrap interval that resamples the questions once for both (paired): tighter than two
    separate intervals, since the questions' difficulty cancels. None where nothing is known."""
    Q = len(before_Q)
    b = before_Q.double()
    if Q == 0 or n < 1 or float(b.sum()) == 0:
        return None
    diff = float((after_b_Q.double().sum() - after_a_Q.double().sum()) / b.sum())
    idx_NQ = _resampled(Q, n, seed)
    b_N = b[idx_NQ].sum(1)
    ok = b_N > 0
    d_N = (after_b_Q.double()[idx_NQ].sum(1) - after_a_Q.double()[idx_NQ].sum(1))[ok] / b_N[ok]
    return diff, _interval(d_N, level)


def gate_split(before_Q: Tensor, after_Q: Tensor, opened_Q: Tensor, mask_Q: Tensor,
               n_choices_Q: Tensor) -> Split:
    """Where a gated score comes from, on the questions of `mask_Q` (one half): accuracy before and
    after on the questions where the gate opened and where it stayed shut, and `ceiling`, the
    unlearning score if every opened question fell to chance (1 / its number of choices) and the
    shut ones kept their clean answers. The gap between `ceiling` and the score is the edit's
    part; the gap between `ceiling` and the no-gate ceiling is the detector's."""
    b, a, o = before_Q[mask_Q].double(), after_Q[mask_Q].double(), opened_Q[mask_Q].bool()
    chance = 1.0 / n_choices_Q[mask_Q].double()

    def side(m: Tensor) -> SplitSide:
        return SplitSide.build(questions=int(m.sum()), before=_acc(b[m]), after=_acc(a[m]))

    floor = float(torch.where(o, chance, b).sum()) / len(b) if len(b) else float("nan")
    return Split.build(opened=side(o), shut=side(~o), ceiling=unlearning_score(_acc(b), floor) if len(b) else None)


def min_score(e: Part, half: str = "dev") -> float | None:
    """The entry's unlearning score on the `half` half, the minimum over its prompt formats
    (plain and e.formats); None where no format has a score."""
    scores = [getattr(h, half).unlearning_score for _, h in e.by_format() if getattr(h, half) is not None]
    scores = [v for v in scores if v is not None]
    return min(scores) if scores else None


FORGET_PROSE = "forget"
"""The key of a sweep entry's forget-prose fluency (its `fluency`), which the fluency bound reads."""


def why_unsafe(e: Part, ratio: float, max_ce_rise: float, *, half: str = "dev",
               max_nll: float | None = None) -> str | None:
    """Why an entry (or its out-of-distribution part) is not retain-safe on the `half` half
    (retain MCQ below ratio x clean in any prompt format, the retain CE rise above max_ce_rise
    where the entry measured it, forget-prose continuations more than max_nll above the clean
    model's own), or None where it is."""
    for fmt, h in e.by_format():
        r = getattr(h, half).retain_mcq if getattr(h, half) is not None else None
        if r is not None and r.after < ratio * r.before - 1e-9:  # 1e-9: 0.495 >= 0.99 * 0.5 despite rounding
            where = "" if fmt == "plain" else f" in format {fmt}"
            return f"retain MCQ {r.before:.3f} -> {r.after:.3f}{where} (< {ratio:g} x clean)"
    loss = e.retain_loss
    if loss is not None and loss.after is not None and loss.before:
        rise = loss.after / loss.before - 1
        if loss.after > loss.before * (1 + max_ce_rise) + 1e-12:
            return f"retain CE {rise:+.1%} (> {max_ce_rise:.0%})"
    f = (e.fluency or {}).get(FORGET_PROSE)
    if max_nll is not None and f is not None and f.nll > f.nll_clean + max_nll + 1e-9:
        return (f"forget-prose continuations at {f.nll:.2f} nats/token under the clean model (its own: "
                f"{f.nll_clean:.2f}; more than {max_nll:g} above: not fluent)")
    return None


def retain_safe(e: Part, ratio: float, max_ce_rise: float, *, half: str = "dev",
                max_nll: float | None = None) -> bool:
    """Retain MCQ on the `half` half kept >= ratio x clean (and the retain CE rise <= max_ce_rise
    where the entry measured it; fluent, with max_nll)."""
    return why_unsafe(e, ratio, max_ce_rise, half=half, max_nll=max_nll) is None


def pick_best(sweep: list[Entry], ratio: float, max_ce_rise: float, *, ood: bool = False,
              max_nll: float | None = None) -> tuple[int | None, str | None]:
    """The highest dev-half unlearning score (the minimum over prompt formats, `min_score`) among
    retain-safe settings that edit at least one feature -> (its index in `sweep`, None), or
    (None, reason). `ood`: judge the entries' out-of-distribution parts."""
    def part(e: Entry) -> Part:
        return e.ood if ood else e

    edits = [i for i, e in enumerate(sweep) if e.n_features > 0 and (not ood or e.ood)]
    if not edits:
        return None, "no setting selected any feature (the run has no candidates?)"
    real = [i for i in edits if min_score(part(sweep[i])) is not None]
    if not real:
        return None, "the clean model answers no dev-half forget question correctly: nothing to unlearn"
    ok = [i for i in real if retain_safe(part(sweep[i]), ratio, max_ce_rise, max_nll=max_nll)]
    if not ok:
        top = max(real, key=lambda i: part(sweep[i]).dev.retain_mcq.after)
        r = part(sweep[top]).dev.retain_mcq
        return None, (f"no retain-safe setting: none kept retain MCQ >= {ratio:g} x clean "
                      f"({r.before:.3f}) with retain CE rise <= {max_ce_rise:.0%}"
                      f"{'' if max_nll is None else f' and fluent continuations (NLL rise <= {max_nll:g} nats/token)'} "
                      f"on the dev half; the closest was {sweep[top].label} at {r.after:.3f}")
    return max(ok, key=lambda i: min_score(part(sweep[i]))), None  # max keeps the first tie


def auroc(pos: Tensor, neg: Tensor) -> float | None:
    """P(score of a forget sequence > score of a retain sequence), ties counting one half."""
    if len(pos) == 0 or len(neg) == 0:
        return None
    p, n = pos.double()[:, None], neg.double()[None, :]
    return float(((p > n).double() + 0.5 * (p == n).double()).mean())


def verdict(a: list[float] | None, b: list[float] | None, name_a: str, name_b: str) -> str:
    """"A beats B" only when A's interval lies wholly above B's; "within noise" otherwise."""
    if not a or not b:
        return f"{name_a} vs {name_b}: not comparable (no retain-safe setting for one of them)"
    if a[0] > b[1]:
        return f"{name_a} beats {name_b} (intervals do not overlap)"
    if b[0] > a[1]:
        return f"{name_b} beats {name_a} (intervals do not overlap)"
    return f"{name_a} vs {name_b}: within noise (intervals overlap)"
