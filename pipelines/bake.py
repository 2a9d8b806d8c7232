"""`ff bake`: a run's chosen edit written into the model's weights, so that a plain
`AutoModelForCausalLM.from_pretrained(OUT)` (no custom code, no hook) has forgotten.

The edit acts on the residual stream at the output of block L (the run's layer). A low-rank
update (peft LoRA) of blocks 0..L learns to produce, from the tokens alone, the residual that
the edit produces there:

    target(x) = edit(h_L(x))      h_L: the clean model's output of block L

on the store's two corpora (`--set target=gated`: the run's chosen setting with its gate, so retain
text mostly keeps its clean residual and forget text gets the gated edit), or the edit on every
unlearn-corpus token and the clean residual on every retain-corpus token (`--set target=corpus`: the
corpus label is the gate). The loss is the squared error at editable positions (no BOS, no padding),
each residual dimension weighed by 1 / its clean variance (a few very large dimensions would
otherwise decide it), in units of the edit's mean squared size on unlearn text (so the clean model
starts at about 1 on unlearn rows and 0 on retain rows), averaged separately over retain and unlearn
rows and summed. Nothing above block L changes, so the LM head never runs: a step costs forward and
backward through L + 1 blocks. The update is then merged (`merge_and_unload`) and the model saved as
a standard folder, with `featureforget_bake.json` (the run, setting, base model and the bake's
losses) and a model card.

Work in progress lives in OUT.bake/ (a checkpoint every `checkpoint_every` steps, written
atomically); the same command after an interruption resumes from it, bit-identically: each step's
contexts are drawn from a generator seeded by (seed, step).
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from cache.atomic import atomic_write, replace_dir
from cache.capture import outputs_at
from cache.chunks import first_line
from pipelines.config import LORA_MODULES, BakeConfig  # noqa: F401  (the public names here too)
from pipelines.errors import EvalError

BAKE_FILE = "featureforget_bake.json"
"""In a baked folder: what it was baked from and how (run, setting, base model, config, losses)."""
CHECKPOINT = "checkpoint.pt"
SAMPLES = "samples.npz"
TARGETS = ("gated", "corpus")


class BakeResult(NamedTuple):
    out_dir: Path
    steps: int
    resumed_from: int
    seconds: float
    loss: dict[str, float]
    """Held-out relative squared error to the target, "retain" and "unlearn" rows: before the bake
    (the clean model) and after ("*_before", "*_after")."""


@dataclass
class _Corpus:
    tokens: np.ndarray  # int32 [n, T]
    mask: np.ndarray  # bool [n, T]: editable (not BOS, not padding)


def check_bake_out(out: Path, overwrite: bool) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise EvalError(f"bake folder {out} exists and is not empty; pass --overwrite or pick another")


def recorded_store(run_dir: str | Path, recorded: str) -> str:
    """The store a run recorded, as a path that opens from here: as recorded when it is a URL,
    absolute, or found from the current folder; else under the nearest folder above the run that
    holds it (`ff run --out X` records X/store.zarr relative to the folder it ran in, and the run
    sits in X/runs/...); else as recorded, for the error to name."""
    if "://" in recorded or Path(recorded).is_absolute() or Path(recorded).exists():
        return recorded
    for parent in Path(run_dir).resolve().parents:
        if (parent / recorded).exists():
            return str(parent / recorded)
    return recorded


def _corpora(store_path: str, eval_rows: int, tokenizer_hash: str) -> tuple[dict[str, _Corpus], dict[str, _Corpus]]:
    """(train, held-out) token rows of the store's retain and unlearn corpora; the last
    `eval_rows` contexts of each corpus are held out for the before/after loss. The store's
    tokens must be the model's tokenizer's."""
    from cache.errors import StoreError
    from cache.store import open_store

    try:
        store = open_store(store_path)
    except (StoreError, OSError, FileNotFoundError) as e:
        raise EvalError(f"cannot open the run's store {store_path}: {e} (pass --store)") from None
    if store.meta.tokenizer_hash != tokenizer_hash:
        raise EvalError(f"the store {store_path} was cached with another tokenizer than the model's "
                        f"({store.meta.model}): bake from a store of the run's model (--store)")
    train, held = {}, {}
    for name in ("retain", "unlearn"):
        c = store.corpus(name)
        tok, mask = np.asarray(c.tokens()), np.asarray(c.mask())
        keep = tok[:, 0] >= 0  # written contexts only
        tok, mask = tok[keep], mask[keep]
        if len(tok) < eval_rows + 8:
            raise EvalError(f"the store {store_path} holds {len(tok)} {name} contexts; a bake needs at least "
                            f"{eval_rows + 8}")
        train[name] = _Corpus(tok[:-eval_rows], mask[:-eval_rows])
        held[name] = _Corpus(tok[-eval_rows:], mask[-eval_rows:])
    return train, held


def _draw(c: _Corpus, n: int, seed: int, step: int, salt: int) -> tuple[Tensor, Tensor]:
    g = np.random.default_rng([seed, step, salt])
    idx = g.choice(len(c.tokens), size=min(n, len(c.tokens)), replace=False)
    return torch.from_numpy(c.tokens[idx].astype(np.int64)), torch.from_numpy(c.mask[idx])


def _own_samples(lm: Any, n: int, T: int, seed: int, res: "_Residual", iv: Any, prefix: str = "",
                 batch: int = 32, progress: bool = True) -> _Corpus:
    """`n` contexts of T tokens sampled from the model as it is (temperature 1, the whole vocabulary,
    from BOS and then `prefix`, no early end), seeded by `seed`; those on which the setting's gate
    edits no token are kept as retain text (all, for a setting without a gate). The pad and BOS
    tokens are never sampled (the bake masks pad tokens out)."""
    from tqdm import tqdm

    model, tok = lm.model, lm.tokenizer
    dev = next(model.parameters()).device
    bos = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    pad_id = int(getattr(tok, "pad_token_id", 0) or 0)
    pre = tok(prefix, add_special_tokens=False).input_ids if prefix else []
    if len(pre) >= T - 1:
        raise EvalError(f"the sampling prefix {prefix!r} is {len(pre)} tokens: it leaves nothing to sample in "
                        f"contexts of {T}")
    torch.manual_seed(seed)
    rows = []
    for i in tqdm(range(0, n, batch), desc="sample retain text", unit="batch", disable=not progress,
                  dynamic_ncols=True):
        ids = torch.tensor([[bos, *pre]], dtype=torch.long, device=dev).expand(min(batch, n - i), -1)
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                 temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=T - ids.shape[1],
                                 min_new_tokens=T - ids.shape[1], pad_token_id=pad_id,
                                 suppress_tokens=sorted({pad_id, bos}))  # a pad token would be masked out
        out = out[:, :T]
        edit_mask = torch.ones_like(out, dtype=torch.bool)
        edit_mask[:, 0] = False  # BOS is never edited
        if iv.threshold is not None:
            with torch.no_grad():
                got = res(out, torch.ones_like(out))
                changed = iv.edit(got[iv.layer], edit_mask, gate_h_BTD=got.get(iv.gate_layer)).changed_B
            out, edit_mask = out[~changed.to(out.device)], edit_mask[~changed.to(out.device)]
        rows.append((out.cpu().numpy().astype(np.int32), edit_mask.cpu().numpy()))
    tokens = np.concatenate([r[0] for r in rows])
    return _Corpus(tokens, np.concatenate([r[1] for r in rows]))


class _Residual:
    """The output of blocks `layers` on one forward through the decoder, stopping after the
    deepest (cache/capture.py), with the autograd graph of the blocks below."""

    def __init__(self, model: Any, layers: list[int]):
        self.model, self.layers = model, sorted(set(layers))

    def __call__(self, ids: Tensor, attn: Tensor) -> dict[int, Tensor]:
        return outputs_at(self.model, ids, attn, self.layers, detach=False)


def _targets(res: _Residual, iv: Any, iv_all: Any, ids: Tensor, attn: Tensor, editable: Tensor,
             unlearn_BT: Tensor, target: str) -> tuple[Tensor, Tensor]:
    """(clean residual at L, target residual at L) for a batch, without gradients."""
    with torch.no_grad():
        got = res(ids, attn)
        h = got[iv.layer]
        if target == "gated":
            tgt = iv.edit(h, editable, gate_h_BTD=got.get(iv.gate_layer)).h_BTD
        else:
            edited = iv_all.edit(h, editable).h_BTD
            tgt = torch.where(unlearn_BT[..., None], edited, h)
    return h.detach(), tgt.detach()


def _loss(h: Tensor, tgt: Tensor, editable: Tensor, unlearn_BT: Tensor, norm: float,
          w_D: Tensor) -> tuple[Tensor, Tensor]:
    """(retain tokens' mean weighted squared error, unlearn tokens') at editable positions."""
    err_BT = (((h - tgt) ** 2) * w_D).sum(-1) / norm
    out = []
    for where in (~unlearn_BT, unlearn_BT):
        m = editable & where
        out.append((err_BT * m).sum() / m.sum().clamp_min(1))
    return out[0], out[1]


def _batch(train: dict[str, _Corpus], cfg: BakeConfig, step: int, pad_id: int,
           salt: int = 0, splice: float = 0.0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step `step`'s contexts: batch_contexts of each corpus, retain rows first -> (ids, attention
    mask, editable, unlearn_BT: which tokens are unlearn text). With `train["samples"]` (the model's
    own samples, `bake(own_samples=)`), half of the retain rows are drawn from them. A `splice` share of
    each corpus's rows continues into the other corpus's text (`_splice`)."""
    n_own = cfg.batch_contexts // 2 if "samples" in train else 0
    r_tok, r_mask = _draw(train["retain"], cfg.batch_contexts - n_own, cfg.seed, step, 2 * salt)
    if n_own:  # the model's own samples: the last rows of the retain half
        s_tok, s_mask = _draw(train["samples"], n_own, cfg.seed, step, 2 * salt + 3)
        r_tok, r_mask = torch.cat([r_tok, s_tok]), torch.cat([r_mask, s_mask])
    u_tok, u_mask = _draw(train["unlearn"], cfg.batch_contexts, cfg.seed, step, 2 * salt + 1)
    tok = torch.cat([r_tok, u_tok])
    editable = torch.cat([r_mask, u_mask]).bool()
    unlearn_BT = (torch.arange(len(tok)) >= len(r_tok))[:, None].expand_as(tok).clone()
    if splice > 0:
        _splice(tok, editable, unlearn_BT, len(r_tok), splice, pad_id,
                np.random.default_rng([cfg.seed, step, 2 * salt + 2]))
    return tok, (tok != pad_id).long(), editable, unlearn_BT  # stored rows are padded with the pad id


def _splice(tok: Tensor, editable: Tensor, unlearn_BT: Tensor, n_retain: int, share: float, pad_id: int,
            g: np.random.Generator) -> None:
    """In place: the first round(share * n) rows of each corpus continue, from a cut drawn between a
    quarter and three quarters of the context, with a row of the other corpus (its tokens after BOS,
    which keep their own corpus's label). Rows with padding before the cut keep their own text.
    With target corpus, each token's target is then its own corpus's: the update is taught to
    follow the topic at hand rather than what came before it (scripts/bake_variants.py; measured and
    not adopted, docs/results.md)."""
    B, T = tok.shape
    src = tok.clone()
    n_unlearn = B - n_retain
    for first, n, other, n_other in ((0, n_retain, n_retain, n_unlearn), (n_retain, n_unlearn, 0, n_retain)):
        for i in range(first, first + round(share * n)):
            cut = int(g.integers(T // 4, 3 * T // 4 + 1))
            j = other + int(g.integers(n_other))
            if bool((src[i, :cut] == pad_id).any()):
                continue
            tok[i, cut:] = src[j, 1:T - cut + 1]
            editable[i, cut:] = src[j, 1:T - cut + 1] != pad_id
            unlearn_BT[i, cut:] = j >= n_retain


def bake(run_dir: str | Path, out_dir: str | Path, lm: Any, cfg: BakeConfig, *, store: str | None = None,
         setting: Any = None, overwrite: bool = False, progress: bool = True, eval_rows: int = 16,
         splice: float = 0.0, own_samples: int = 0, sample_prefix: str = "", first_block: int = 0) -> BakeResult:
    """Train, merge and save (module docstring). Resumes from OUT.bake/ when its checkpoint was
    written by the same run, setting and config. The update is merged into `lm.model` in place:
    afterwards it is the baked model. `splice`: the share of each step's contexts that change
    corpus midway (`_splice`); `own_samples`: that many contexts sampled from the model (after
    `sample_prefix`), kept where the setting's gate stays shut, stand for half of each step's retain
    rows (`_own_samples`); `first_block`: the update covers blocks first_block..L only, the blocks
    below keep their weights. All three are research options, measured and not adopted
    (scripts/bake_variants.py, docs/results.md)."""
    from peft import LoraConfig, get_peft_model
    from tqdm import tqdm

    from pipelines.evaluate import check_model
    from pipelines.intervene import Intervention, chosen_setting, load_run

    if cfg.target not in TARGETS:
        raise EvalError(f"unknown bake target '{cfg.target}': use {' or '.join(TARGETS)}")
    if cfg.steps < 1 or cfg.batch_contexts < 1 or cfg.rank < 1:
        raise EvalError("steps, batch_contexts and rank must be positive")
    if not 0.0 <= splice <= 1.0:
        raise EvalError(f"splice is a share of the contexts, 0 to 1, got {splice}")
    if own_samples < 0:
        raise EvalError(f"own_samples is a number of contexts, got {own_samples}")
    if first_block < 0:
        raise EvalError(f"first_block is a block index, 0 or more, got {first_block}")
    out = Path(out_dir)
    check_bake_out(out, overwrite)
    run = load_run(run_dir)
    check_model(run, lm)
    if first_block > run.layer:
        raise EvalError(f"first_block={first_block} is above the run's edited layer {run.layer}: "
                        f"the update must reach a block 0..{run.layer}")
    setting = setting if setting is not None else chosen_setting(run_dir)
    if cfg.multiplier is not None:
        setting = setting.replace(multiplier=cfg.multiplier)
    iv = Intervention(run, setting)
    iv_all = Intervention(run, setting.changed(gate="none"))
    if iv.n_features == 0:
        raise EvalError(f"the setting {setting.label} edits no feature: nothing to bake")
    store_path = store or recorded_store(run_dir, str(run.config.unlearn_store or run.config.store))
    train, held = _corpora(store_path, eval_rows, lm.info.tokenizer_hash)
    model = lm.model
    dev = next(model.parameters()).device
    iv.to(dev), iv_all.to(dev)
    layers = [run.layer] + ([iv.gate_layer] if iv.threshold is not None else [])
    res = _Residual(model, layers)
    pad_id = int(getattr(lm.tokenizer, "pad_token_id", 0) or 0)
    same = {k: v for k, v in cfg.to_dict().items() if k != "checkpoint_every"}  # what decides the weights
    stamp = {"run": str(Path(run_dir).resolve()), "setting": setting.to_dict(), "config": same,
             "model_hash": lm.info.weights_hash, "store": store_path, **({"splice": splice} if splice else {}),
             **({"own_samples": own_samples, "sample_prefix": sample_prefix} if own_samples else {}),
             **({"first_block": first_block} if first_block else {})}

    work = out.with_name(out.name + ".bake")
    ckpt_path = work / CHECKPOINT
    if overwrite:
        shutil.rmtree(work, ignore_errors=True)
    ckpt = None
    if ckpt_path.is_file():
        try:  # weights_only: a checkpoint is data; loading one must not run code
            ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise EvalError(f"cannot load the bake checkpoint {ckpt_path}: {first_line(e)}; "
                            "pass --overwrite to start over") from e
        if ckpt.get("stamp") != stamp:
            raise EvalError(f"{work} holds a bake of another run, setting or config; pass --overwrite to start over")
    work.mkdir(parents=True, exist_ok=True)
    if own_samples:
        train["samples"] = _samples_of(work, ckpt is not None, lm, own_samples, sample_prefix, cfg.seed,
                                                  train, res, iv, progress)

    torch.manual_seed(cfg.seed)
    lora = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=0.0, target_modules=list(cfg.modules),
                      layers_to_transform=list(range(first_block, run.layer + 1)), bias="none")
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():  # peft asks transformers about gradient checkpointing by a deprecated name
        warnings.simplefilter("ignore", FutureWarning)
        pm = get_peft_model(model, lora)
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(cfg.warmup, 1)) * max(0.0, 1.0 - s / cfg.steps))

    def held_loss() -> tuple[float, float]:
        tot = [0.0, 0.0]
        with torch.no_grad():
            for i in range(0, eval_rows, cfg.batch_contexts):
                part = slice(i, i + cfg.batch_contexts)
                tok = torch.cat([torch.from_numpy(held[n].tokens[part]).long() for n in ("retain", "unlearn")])
                mask = torch.cat([torch.from_numpy(held[n].mask[part]) for n in ("retain", "unlearn")])
                unl = (torch.arange(len(tok)) >= len(tok) // 2)[:, None].expand_as(tok)
                ids, attn = tok, (tok != pad_id).long()  # stored rows are padded with the pad id
                ids, attn, mask, unl = ids.to(dev), attn.to(dev), mask.bool().to(dev), unl.to(dev)
                with pm.disable_adapter():
                    h0, tgt = _targets(res, iv, iv_all, ids, attn, mask, unl, cfg.target)
                h = res(ids, attn)[run.layer]
                lr_, lu_ = _loss(h, tgt, mask, unl, norm, w_D)
                tot[0] += float(lr_)
                tot[1] += float(lu_)
        n = -(-eval_rows // cfg.batch_contexts)
        return tot[0] / n, tot[1] / n

    start = 0
    if ckpt is not None:
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(pm, ckpt["adapter"])
        opt.load_state_dict(ckpt["opt"])
        sched.load_state_dict(ckpt["sched"])
        start, norm, w_D, before = int(ckpt["step"]), float(ckpt["norm"]), ckpt["w_D"].to(dev), ckpt["before"]
    else:
        with pm.disable_adapter():  # the loss's unit: the edit's mean squared size on unlearn text
            ids, attn, editable, unl = (t.to(dev) for t in _batch(train, cfg, 0, pad_id, salt=1, splice=splice))
            h, tgt = _targets(res, iv, iv_all, ids, attn, editable, unl, cfg.target)
            w_D = 1.0 / h[editable].var(0).clamp_min(1e-6)  # each dimension by 1 / its clean variance
            w_D = w_D / w_D.mean()
            norm = float((((tgt - h) ** 2) * w_D).sum(-1)[editable & unl].mean())
        if not norm > 0:
            raise EvalError(f"the setting {setting.label} changes nothing on the store's unlearn text: nothing to bake")
        before = held_loss()

    t0 = time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc="bake", unit="step", disable=not progress, dynamic_ncols=True)
    pm.train()
    for step in range(start, cfg.steps):
        ids, attn, editable, unl = (t.to(dev) for t in _batch(train, cfg, step, pad_id, splice=splice))
        with pm.disable_adapter():
            _, tgt = _targets(res, iv, iv_all, ids, attn, editable, unl, cfg.target)
        h = res(ids, attn)[run.layer]
        l_r, l_u = _loss(h, tgt, editable, unl, norm, w_D)
        loss = l_r + cfg.forget_weight * l_u
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        sched.step()
        bar.update(1)
        bar.set_postfix(retain=f"{l_r.item():.3f}", unlearn=f"{l_u.item():.3f}")
        if (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            _checkpoint(ckpt_path, pm, opt, sched, step + 1, norm, w_D, before, stamp)
    bar.close()
    pm.eval()
    after = held_loss()
    loss_d = {"retain_before": before[0], "unlearn_before": before[1], "retain_after": after[0],
              "unlearn_after": after[1]}
    merged = pm.merge_and_unload()
    for p in merged.parameters():
        p.requires_grad_(False)
    folder = _save(merged, lm, out, {**stamp, "base_model": lm.info.name, "layer": run.layer,
                                     "setting_label": setting.label, "loss": loss_d, "steps": cfg.steps,
                                     **({"own_samples_kept": len(train["samples"].tokens)} if own_samples else {})})
    shutil.rmtree(work, ignore_errors=True)
    return BakeResult(folder, cfg.steps, start, round(time.perf_counter() - t0, 1), loss_d)


def _samples_of(work: Path, resuming: bool, lm: Any, n: int, prefix: str, seed: int, train: dict[str, _Corpus],
                res: _Residual, iv: Any, progress: bool) -> _Corpus:
    """The `own_samples` contexts: sampled once and kept in the work folder, so a resumed bake
    trains on the same ones (and does not sample again)."""
    import io

    path = work / SAMPLES
    if resuming and path.is_file():
        with np.load(path) as z:
            return _Corpus(z["tokens"], z["mask"])
    c = _own_samples(lm, n, train["retain"].tokens.shape[1], seed, res, iv, prefix, progress=progress)
    if len(c.tokens) < 1:
        raise EvalError(f"the setting's gate opens on every one of the {n} samples of the model: no retain "
                        "text to draw from them")
    buf = io.BytesIO()
    np.savez(buf, tokens=c.tokens, mask=c.mask)
    atomic_write(path, buf.getvalue())
    return c


def _checkpoint(path: Path, pm: Any, opt: Any, sched: Any, step: int, norm: float, w_D: Tensor, before: Any,
                stamp: dict[str, Any]) -> None:
    import io

    from peft import get_peft_model_state_dict

    buf = io.BytesIO()
    torch.save({"adapter": get_peft_model_state_dict(pm), "opt": opt.state_dict(), "sched": sched.state_dict(),
                "step": step, "norm": norm, "w_D": w_D.cpu(), "before": before,
                "stamp": stamp}, buf)
    atomic_write(path, buf.getvalue())


def _save(model: Any, lm: Any, out: Path, meta: dict[str, Any]) -> Path:
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp, safe_serialization=True)
    lm.tokenizer.save_pretrained(tmp)
    (tmp / BAKE_FILE).write_text(json.dumps(meta, indent=2))
    (tmp / "README.md").write_text(bake_card(meta))
    return replace_dir(tmp, out)


def bake_card(meta: dict[str, Any]) -> str:
    """The baked folder's README: what was baked in, how close the weights come, the threat model."""
    loss, layer, first = meta["loss"], meta["layer"], meta.get("first_block", 0)
    return "\n".join([
        f"# {meta['base_model']}, with FeatureForget unlearning baked into the weights", "",
        "A standard model folder: `AutoModelForCausalLM.from_pretrained(FOLDER)` (no custom code). "
        f"Blocks {first}..{layer} carry a merged low-rank update trained (`ff bake`) to reproduce the edit "
        f"`{meta['setting_label']}` of run `{Path(meta['run']).name}` at the output of block {layer}.", "",
        "## How close the weights come to the edit", "",
        "Held-out contexts of the run's store, squared error to the edited residual in units of the edit's "
        "mean squared size on unlearn text (the clean model: about 1 there, 0 on retain text):", "",
        f"- retain text: {loss['retain_before']:.4f} (clean model) -> {loss['retain_after']:.4f}",
        f"- unlearn text: {loss['unlearn_before']:.4f} (clean model) -> {loss['unlearn_after']:.4f}", "",
        "Measure it as a user would: `ff eval --model FOLDER` (the same question sets and prompt formats as the "
        "hooked edit).", "",
        "## Threat model", "",
        "The forgetting is in the weights: loading the folder without ff or custom code keeps it. Fine-tuning on "
        "forget-domain text can bring it back; docs/threat-model.md in FeatureForget says what was measured.", ""])
