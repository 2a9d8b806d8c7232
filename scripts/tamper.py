"""Tampering: how many fine-tuning steps on a few forget-domain texts bring the forgotten answers
back. Fine-tunes a model with LoRA (rank 8 on every linear layer of every block, Adam) on a pool
of `--examples` contexts of a store's unlearn corpus (training text, never the evaluation
questions; `--corpus retain`: the retain corpus, the control), `--batch` contexts a step, and
scores the plain-prompt question sets after each number of steps in `--steps`: forget and retain
accuracy on the test halves, in and out of distribution, against the base model's.

    python scripts/tamper.py --model ff-baked --store ff-demo/store.zarr --out tamper-baked.json
    python scripts/tamper.py --model gemma-3-270m --store ff-demo/store.zarr --out tamper-clean.json
    python scripts/tamper.py --model gemma-3-270m --run ff-demo/runs/layer_4/featureforget \\
        --store ff-demo/store.zarr --out tamper-hooked.json

`--model` is the model fine-tuned (a baked folder, or the base model); `--run` keeps that run's
chosen edit hooked while fine-tuning and scoring (an attacker who fine-tunes a served, hooked
model). Scores are against `--base` (default: the baked folder's base, else `--model`).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cache.models import load_model  # noqa: E402
from cache.store import open_store  # noqa: E402
from pipelines.artifact import base_of  # noqa: E402
from pipelines.config import EvalConfig  # noqa: E402
from pipelines.evalsets import eval_data  # noqa: E402
from pipelines.scoring import unlearning_score  # noqa: E402

SETS = ("forget_mcq", "retain_mcq", "ood_forget_mcq", "ood_retain_mcq")


def attack_rows(store: str, corpus: str, n: int, ctx: int, seed: int) -> torch.Tensor:
    """`n` contexts of one of the store's corpora, cut to `ctx` tokens (BOS first)."""
    tok = np.asarray(open_store(store).corpus(corpus).tokens())
    tok = tok[tok[:, 0] >= 0]
    idx = np.random.default_rng(seed).choice(len(tok), size=n, replace=False)
    return torch.from_numpy(tok[idx, :ctx].astype(np.int64))


def scores(lm, cfg: EvalConfig, tag: str, iv=None) -> dict[str, dict[str, float]]:
    """Accuracy of each plain-prompt question set, dev and test halves, of the model as it is now
    (with `iv`, a pipelines.intervene.Intervention: with that edit applied, as `ff eval` applies it)."""
    now = dataclasses.replace(lm, info=dataclasses.replace(lm.info, weights_hash=f"{lm.info.weights_hash}+{tag}"))
    data = eval_data(now, cfg)
    data.prepare(lm.model, [] if iv is None else sorted({iv.layer, iv.gate_layer}))
    out = {}
    for name in SETS:
        if data.has(name):
            s = getattr(data, name)
            c = (s.clean_result() if iv is None else s.run(lm.model, iv)).correct_Q.double()
            out[name] = {"test": float(c[s.test_Q].mean()), "dev": float(c[~s.test_Q].mean())}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="The model to fine-tune: a baked folder or the base model.")
    ap.add_argument("--store", required=True, help="Store whose unlearn corpus gives the fine-tuning texts.")
    ap.add_argument("--run", default=None, help="Keep this run's chosen edit hooked while fine-tuning and scoring.")
    ap.add_argument("--base", default=None, help="The model the scores compare with. Default: the folder's base.")
    ap.add_argument("--steps", default="0,10,50,200", help="Step counts at which to score. [0,10,50,200]")
    ap.add_argument("--corpus", default="unlearn", choices=["unlearn", "retain"],
                    help="The store's corpus the fine-tuning texts come from (retain: the control). [unlearn]")
    ap.add_argument("--examples", type=int, default=16, help="Fine-tuning contexts (the pool). [16]")
    ap.add_argument("--batch", type=int, default=4, help="Contexts per step, drawn from the pool. [4]")
    ap.add_argument("--ctx", type=int, default=64, help="Tokens per context. [64]")
    ap.add_argument("--rank", type=int, default=8, help="LoRA rank. [8]")
    ap.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate. [1e-4]")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--preset", default="demo", help="ff eval preset whose question sets are scored. [demo]")
    ap.add_argument("--out", default=None, help="Write the results as JSON here.")
    args = ap.parse_args()
    steps = sorted({int(s) for s in args.steps.split(",")})
    cfg = EvalConfig.preset(args.preset).replace(forget_text=None, retain_text=None, ood_forget_text=None,
                                                 ood_retain_text=None, formats=("plain",))
    base_name = args.base or base_of(args.model) or args.model
    base = scores(load_model(base_name), cfg, "base")
    lm = load_model(args.model)
    iv = None
    if args.run:  # the attacker fine-tunes the served model: the edit stays in while training and scoring
        from pipelines.intervene import Intervention, chosen_setting, load_run

        iv = Intervention(load_run(args.run), chosen_setting(args.run))
    rows = attack_rows(args.store, args.corpus, args.examples, args.ctx, args.seed)
    from peft import LoraConfig, get_peft_model

    for p in lm.model.parameters():
        p.requires_grad_(False)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = get_peft_model(lm.model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                target_modules=modules))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=args.lr)
    rng = np.random.default_rng(args.seed + 1)
    pad = int(lm.tokenizer.pad_token_id or 0)
    results, t0, done = [], time.perf_counter(), 0
    for target in steps:
        lm.model.train()
        hook = None if iv is None or done >= target else iv.attach(lm.model)  # scoring applies it itself
        while done < target:
            ids = rows[rng.choice(len(rows), size=min(args.batch, len(rows)), replace=False)].to(lm.device)
            mask = (ids != pad).long()
            labels = ids.masked_fill(mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            done += 1
        if hook is not None:
            hook.remove()
        lm.model.eval()
        with torch.no_grad():
            now = scores(lm, cfg, f"step{done}", iv)
        row = {"steps": done, "sets": now, "seconds": round(time.perf_counter() - t0, 1)}
        for p in ("", "ood_"):
            f = f"{p}forget_mcq"
            if f in now:
                row[f"{p}score"] = unlearning_score(base[f]["test"], now[f]["test"])
        results.append(row)
        print(f"steps {done:3d}: " + ", ".join(f"{k} {v['test']:.3f}" for k, v in now.items())
              + f"; score {row.get('score')}, ood score {row.get('ood_score')} ({row['seconds']:.0f} s)",
              flush=True)
    res = {"model": args.model, "run": args.run, "base": base_name, "base_sets": base, "corpus": args.corpus,
           "examples": args.examples, "batch": args.batch, "ctx": args.ctx, "rank": args.rank, "lr": args.lr,
           "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
