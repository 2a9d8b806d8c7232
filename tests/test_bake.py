"""`ff bake` writes a run's edit into the weights of the blocks up to its layer (a standard folder,
no custom code), resumes after an interruption to the same weights, and refuses bad input in one
line; `ff eval --model FOLDER` scores a folder as it is against its base model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from test_pipelines_evaluate import write_mcq
from test_pipelines_helpers import make_run, single_thread  # noqa: F401 (autouse fixture)

import pipelines.bake as bake_mod
from cache.models import decoder_layers, load_model
from cli import main
from pipelines.config import EvalConfig, Setting
from pipelines.intervene import Intervention, load_run

LAYER = 1
SETTING = Setting(mode="clamp", multiplier=2.0, top_n=20, gate="none")
"""Small enough for blocks 0..LAYER to reach: each block adds a normed (bounded) output."""


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model, tiny_corpora) -> str:
    out = tmp_path_factory.mktemp("bake") / "s.zarr"
    r = CliRunner().invoke(main, ["cache", "--model", tiny_model, "--retain", tiny_corpora[0], "--unlearn",
                                  tiny_corpora[1], "--contexts", "48", "--set", "ctx_len=16", "--layers", str(LAYER),
                                  "--set", "chunk_contexts=8", "--quiet", "--out", str(out)])
    assert r.exit_code == 0, r.output
    return str(out)


@pytest.fixture(scope="module")
def lm(tiny_model):
    return load_model(tiny_model, device="cpu")


def _run(tmp_path: Path, lm, store: str, setting: Setting = SETTING) -> Path:
    run = make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, n_candidates=40,
                   model=lm.info.name, b_enc=0.2)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "store": store, "unlearn_store": store}))
    (run / "unlearning.json").write_text(json.dumps({"best": {"setting": setting.to_dict(), "label": setting.label}}))
    return run


def _bake(run: Path, out: Path, *extra: str):
    return CliRunner().invoke(main, ["bake", "--run", str(run), "--out", str(out), "--set", "steps=30",
                                     "--set", "batch_contexts=4", "--set", "lr=3e-3", "--set", "rank=8",
                                     "--set", "multiplier=2", "--set", "forget_weight=1", "--quiet", *extra])


def _resid(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[LAYER + 1]


@pytest.mark.parametrize("target", ["gated", "corpus"])
def test_baked_folder_loads_plainly_and_its_weights_carry_the_edit(lm, store, tmp_path, target):
    from transformers import AutoModelForCausalLM

    run = _run(tmp_path, lm, store)
    out = tmp_path / "baked"
    r = _bake(run, out, "--set", f"target={target}")
    assert r.exit_code == 0, r.output
    assert "wrote" in r.output and not (tmp_path / "baked.bake").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert "auto_map" not in cfg and "featureforget" not in cfg  # a standard folder: no custom code
    baked = AutoModelForCausalLM.from_pretrained(str(out)).eval()
    meta = json.loads((out / bake_mod.BAKE_FILE).read_text())
    assert meta["base_model"] == lm.info.name and meta["layer"] == LAYER and meta["setting"] == SETTING.to_dict()
    # the blocks above the edited layer and the head are the base model's, bit for bit; the ones up to it changed
    base_sd, new_sd = lm.model.state_dict(), baked.state_dict()
    for k, v in base_sd.items():
        above = any(f"layers.{i}." in k for i in range(LAYER + 1, len(decoder_layers(lm.model))))
        if above or "layers." not in k:
            assert torch.equal(v, new_sd[k]), k
    assert any(not torch.equal(base_sd[k], new_sd[k]) for k in base_sd if f"layers.{LAYER}." in k)
    # on unlearn text the baked residual at the layer is closer to the edited one than the clean model's
    from cache.store import open_store

    ids = torch.from_numpy(open_store(store).corpus("unlearn").tokens()[-8:].astype("int64"))  # held out by the bake
    assert bool((ids[:, 1:] != 0).all())  # no padding in these rows
    iv = Intervention(load_run(run), SETTING)
    clean = _resid(lm.model, ids)
    target_h = iv.edit(clean, ids != lm.model.config.bos_token_id).h_BTD
    err_clean = float(((clean - target_h) ** 2)[:, 1:].sum(-1).mean())
    err_baked = float(((_resid(baked, ids) - target_h) ** 2)[:, 1:].sum(-1).mean())
    assert err_baked < 0.6 * err_clean, (err_baked, err_clean)
    loss = meta["loss"]
    assert loss["unlearn_after"] < loss["unlearn_before"]


def test_first_block_keeps_the_blocks_below_it_bit_for_bit(lm, store, tmp_path, tiny_model):
    from pipelines.config import BakeConfig
    from pipelines.errors import EvalError

    run = _run(tmp_path, lm, store)
    fresh = load_model(tiny_model, device="cpu")
    cfg = BakeConfig(steps=4, batch_contexts=4, rank=4, multiplier=2.0, forget_weight=1.0)
    for bad, msg in ((LAYER + 1, f"^first_block={LAYER + 1} is above the run's edited layer {LAYER}"),
                     (-1, "^first_block is a block index, 0 or more, got -1$")):
        with pytest.raises(EvalError, match=msg):
            bake_mod.bake(run, tmp_path / "refused", fresh, cfg, first_block=bad, progress=False)
        assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.bake").exists()
    out = tmp_path / "late"
    bake_mod.bake(run, out, fresh, cfg, first_block=LAYER, progress=False)
    base_sd = lm.model.state_dict()
    new_sd = load_model(str(out)).model.state_dict()
    changed = {k for k in base_sd if not torch.equal(base_sd[k], new_sd[k])}
    assert changed and all(f"layers.{LAYER}." in k for k in changed), sorted(changed)
    meta = json.loads((out / bake_mod.BAKE_FILE).read_text())
    assert meta["first_block"] == LAYER and f"Blocks {LAYER}..{LAYER} carry" in (out / "README.md").read_text()


def test_a_bake_killed_with_sigkill_resumes_to_the_same_weights(lm, store, tmp_path):
    import os
    import subprocess
    import sys

    from conftest import kill_when

    run = _run(tmp_path, lm, store)
    steps = ("--set", "steps=200")
    out = tmp_path / "resumed"
    argv = ["bake", "--run", str(run), "--out", str(out), "--set", "batch_contexts=4", "--set", "lr=3e-3",
            "--set", "rank=8", "--set", "multiplier=2", "--set", "forget_weight=1", "--quiet", *steps]
    proc = subprocess.Popen([sys.executable, "-m", "cli", *argv], env={**os.environ, "PYTHONUNBUFFERED": "1"},
                            cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / "resumed.bake" / bake_mod.CHECKPOINT
    kill_when(proc, lambda: int(ckpt.is_file()), 1, what="the bake")  # SIGKILL once a checkpoint is on disk
    assert not out.exists() and ckpt.is_file()
    at = torch.load(ckpt, weights_only=True)["step"]
    assert 0 < at < 200
    r = _bake(run, out, "--set", "steps=210")  # another config does not take that checkpoint over
    assert r.exit_code == 2 and "another run, setting or config" in r.output, r.output
    r = _bake(run, out, *steps)
    assert r.exit_code == 0 and f"resumed at step {at}" in r.output, r.output
    whole = tmp_path / "whole"
    assert _bake(run, whole, *steps).exit_code == 0
    a = load_model(str(whole)).model.state_dict()
    b = load_model(str(out)).model.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6, rtol=0) for k in a)
    assert not ckpt.parent.exists()


def test_bake_refuses_bad_input_in_one_line_and_writes_nothing(lm, store, tmp_path):
    run = _run(tmp_path, lm, store)
    cases = []
    no_choice = tmp_path / "nochoice"
    shutil.copytree(run, no_choice)
    (no_choice / "unlearning.json").unlink()
    cases.append((["--run", str(no_choice)], "ff eval --run"))
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    cases.append((["--out", str(full)], "exists and is not empty"))
    cases.append((["--store", str(tmp_path / "nowhere.zarr")], "cannot open the run's store"))
    other = tmp_path / "other-model"
    shutil.copytree(lm.info.name, other)
    m = load_model(str(other)).model
    with torch.no_grad():
        next(m.parameters()).add_(1.0)
    m.save_pretrained(other)
    cases.append((["--model", str(other)], "was trained on model"))
    from conftest import make_store

    cases.append((["--store", str(make_store(tmp_path / "alien.zarr"))], "another tokenizer"))
    for extra, needle in cases:
        args = {"--run": str(run), "--out": str(tmp_path / "o"), "--set": "steps=2"}
        for i in range(0, len(extra), 2):
            args[extra[i]] = extra[i + 1]
        r = CliRunner().invoke(main, ["bake", *[x for kv in args.items() for x in kv], "--quiet"])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert [line for line in r.output.splitlines() if line.startswith("error:")] and needle in r.output, r.output
        assert not (tmp_path / "o").exists()
    r = CliRunner().invoke(main, ["bake", "--run", str(run), "--out", str(tmp_path / "o"), "--set", "steps=0"])
    assert r.exit_code == 2 and "error: bake options must be positive: steps=0" in r.output
    assert not (tmp_path / "o").exists()
    assert (full / "keep.txt").read_text() == "mine" and [p.name for p in full.iterdir()] == ["keep.txt"]


def test_bake_finds_the_store_a_run_recorded_relative_to_the_folder_it_ran_in(lm, store, tmp_path, monkeypatch):
    """`ff run --out X` records X/store.zarr relative to where it ran: a bake started from another
    folder finds it above the run folder."""
    demo = tmp_path / "demo"
    shutil.copytree(store, demo / "store.zarr")
    run = _run(tmp_path, lm, "demo/store.zarr")
    (demo / "runs").mkdir()
    run = Path(shutil.move(str(run), demo / "runs" / "layer_1"))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    r = CliRunner().invoke(main, ["bake", "--run", str(run), "--out", str(tmp_path / "o"), "--set", "steps=2",
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "o" / "featureforget_bake.json").read_text())["store"] == str(demo / "store.zarr")


def _plain_correct(model, tok, questions, template: str) -> torch.Tensor:
    """Each question scored the plain way: one forward per choice, the sum of log p of its tokens."""
    out = []
    for q in questions:
        prompt = tok(template.format(question=q.question)).input_ids
        lps = []
        for c in q.choices:
            cont = tok(" " + c, add_special_tokens=False).input_ids
            ids = torch.tensor([prompt + cont])
            with torch.no_grad():
                lp = model(ids).logits[0].log_softmax(-1)
            lps.append(sum(float(lp[len(prompt) - 1 + i, t]) for i, t in enumerate(cont)))
        out.append(int(torch.tensor(lps).argmax()) == q.answer)
    return torch.tensor(out)


def test_ff_eval_model_scores_a_folder_as_it_is_against_its_base(lm, tmp_path, tiny_model, tiny_corpora):
    from pipelines.data import load_mcq, sample_split

    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    model = load_model(str(other)).model
    with torch.no_grad():
        for p in decoder_layers(model)[2].parameters():
            p.add_(0.5 * torch.randn_like(p))
    model.save_pretrained(other)
    f, r = write_mcq(tmp_path / "f.jsonl", 16, 1), write_mcq(tmp_path / "r.jsonl", 12, 2)
    args = ["eval", "--model", str(other), "--base", tiny_model, "--forget-mcq", f, "--retain-mcq", r,
            "--set", f"forget_text={tiny_corpora[1]}", "--set", f"retain_text={tiny_corpora[0]}",
            "--set", "max_text_tokens=200", "--set", f"ood_forget_mcq={f}", "--set", f"ood_retain_mcq={r}",
            "--set", "ood_forget_text=none", "--set", "ood_retain_text=none", "--formats", "plain,kshot2",
            "--set", "format_questions=6", "--quiet"]
    res = CliRunner().invoke(main, args + ["--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output[res.output.index("{"):])
    best = out["best"]
    qs, test_Q = sample_split(load_mcq(f, "forget"), None, EvalConfig().sample_seed)
    tok = lm.tokenizer
    want_after = _plain_correct(model, tok, qs, EvalConfig().mcq_template)
    want_before = _plain_correct(lm.model, tok, qs, EvalConfig().mcq_template)
    bits = best["test"]["forget_correct"]
    assert bits["after"] == "".join("1" if v else "0" for v in want_after[test_Q].tolist())
    assert bits["before"] == "".join("1" if v else "0" for v in want_before[test_Q].tolist())
    assert bits["after"] != bits["before"] or best["forget_loss"]["after"] != best["forget_loss"]["before"]
    assert set(best["formats"]) == {"kshot2"} and "formats_min" in best
    ood = best["ood"]  # the same files out of distribution: the same answers, a side of its own
    assert ood["test"]["forget_correct"] == bits and ood["unlearning_score"] == best["unlearning_score"]
    assert set(ood["formats"]) == {"kshot2"} and "forget_loss" not in ood
    assert set(best["fluency"]) == {"forget_text", "retain_text"}
    assert best["fluency"]["forget_text"]["changed"] > 0
    text = CliRunner().invoke(main, args)
    assert text.exit_code == 0 and "in distribution: test score" in text.output and "format kshot2" in text.output


def test_ff_eval_model_refuses_an_exported_folder_and_a_folder_without_base(tmp_path, tiny_model):
    exported = tmp_path / "exported"
    shutil.copytree(tiny_model, exported)
    cfg = json.loads((exported / "config.json").read_text())
    (exported / "config.json").write_text(json.dumps({**cfg, "featureforget": {"layer": 1}}))
    for args, needle in ((["--model", str(exported), "--base", tiny_model], "exported folder"),
                         (["--model", tiny_model], "pass --base"),
                         (["--model", str(tmp_path / "missing")], "no model folder"),
                         (["--model", tiny_model, "--base", tiny_model, "--save"], "--json > FILE"),
                         ([], "pass --run RUN")):
        r = CliRunner().invoke(main, ["eval", *args, "--quiet"])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_spliced_contexts_change_corpus_midway_and_label_each_token_by_its_own():
    import numpy as np

    from pipelines.config import BakeConfig

    T, n, pad, bos = 16, 6, 0, 2

    def corpus(first: int, padded: int = 0):
        tok = np.arange(first, first + n * T, dtype=np.int32).reshape(n, T)
        tok[:, 0] = bos
        if padded:
            tok[-1, -padded:] = pad  # one short context, padded at its end
        return bake_mod._Corpus(tok, (tok != bos) & (tok != pad))

    train = {"retain": corpus(1000, padded=13), "unlearn": corpus(5000)}
    cfg = BakeConfig(batch_contexts=n)
    plain_ids, _, plain_edit, plain_unl = bake_mod._batch(train, cfg, 1, pad)
    ids, attn, editable, unl = bake_mod._batch(train, cfg, 1, pad, splice=0.5)
    assert torch.equal(plain_unl, torch.arange(2 * n)[:, None].expand(-1, T) >= n)  # splice 0: rows whole
    assert torch.equal(ids[:, 0], torch.full((2 * n,), bos))
    assert torch.equal(attn, (ids != pad).long()) and torch.equal(editable, (ids != bos) & (ids != pad))
    assert torch.equal(unl[editable], (ids >= 5000)[editable])  # each token labelled by the corpus it came from
    changed = (ids != plain_ids).any(1)
    for first in (0, n):  # three rows of each corpus continue in the other; padded rows keep their text
        rows = range(first, first + 3)
        for i in rows:
            padded_early = bool((plain_ids[i, :T // 4] == pad).any())
            assert bool(changed[i]) != padded_early
            if changed[i]:
                cut = int((unl[i] != unl[i, 0]).nonzero()[0])
                assert T // 4 <= cut <= 3 * T // 4 and torch.equal(ids[i, :cut], plain_ids[i, :cut])
                assert bos not in ids[i, cut:].tolist()  # the second text continues, without its BOS
        assert not changed[first + 3:first + n].any()
    assert bool((plain_ids[:3] == pad).any()) and int(changed[:3].sum()) == 2  # the padded context kept its text
    assert torch.equal(bake_mod._batch(train, cfg, 1, pad, splice=0.5)[0], ids)  # seeded by (seed, step)


def test_a_spliced_bake_refuses_a_share_outside_0_1_and_records_its_share(store, tmp_path, tiny_model):
    from pipelines.config import BakeConfig
    from pipelines.errors import EvalError

    fresh = load_model(tiny_model, device="cpu")  # a bake merges into the model it is given
    run = _run(tmp_path, fresh, store)
    with pytest.raises(EvalError, match=r"^splice is a share of the contexts, 0 to 1, got 1.5$"):
        bake_mod.bake(run, tmp_path / "refused", fresh, BakeConfig(), splice=1.5)
    assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.bake").exists()
    cfg = BakeConfig(steps=4, batch_contexts=4, rank=4, multiplier=2.0, forget_weight=1.0)
    res = bake_mod.bake(run, tmp_path / "baked", fresh, cfg, splice=0.5, progress=False)
    meta = json.loads((res.out_dir / bake_mod.BAKE_FILE).read_text())
    assert meta["splice"] == 0.5 and meta["loss"]["unlearn_after"] < meta["loss"]["unlearn_before"]


def _probe_run(tmp_path: Path, lm) -> Path:
    return make_run(tmp_path / "run", lm.info.d_model, LAYER, lm.info.weights_hash, model=lm.info.name,
                    probe_layer=LAYER - 1)


def test_own_samples_are_the_models_seeded_samples_that_the_gate_leaves_unedited(lm, tmp_path):
    from pipelines.errors import EvalError

    """bake(own_samples=): contexts sampled from the model (seeded, full length, from BOS and a
    prefix), kept where the setting's gate edits no token; a gateless setting keeps them all."""
    run = load_run(_probe_run(tmp_path, lm))
    n, T = 12, 16
    res = bake_mod._Residual(lm.model, [LAYER, LAYER - 1])
    every = bake_mod._own_samples(lm, n, T, 7, res, Intervention(run, SETTING), batch=5, progress=False)
    assert every.tokens.shape == (n, T)
    assert (every.tokens[:, 0] == lm.tokenizer.bos_token_id).all() and (every.tokens[:, 1:] != 0).all()
    assert not every.mask[:, 0].any() and every.mask[:, 1:].all()
    again = bake_mod._own_samples(lm, n, T, 7, res, Intervention(run, SETTING), batch=5, progress=False)
    other = bake_mod._own_samples(lm, n, T, 8, res, Intervention(run, SETTING), batch=5, progress=False)
    assert (again.tokens == every.tokens).all() and (other.tokens != every.tokens).any()  # seeded

    ids = torch.from_numpy(every.tokens.astype("int64"))
    got = res(ids, torch.ones_like(ids))
    probe = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20, gate_threshold=0.0))
    for thr in torch.linspace(-3, 3, 61).tolist():  # a threshold at which the gate opens on some samples only
        iv = Intervention(run, Setting(gate="probe", mode="clamp", multiplier=30.0, top_n=20,
                                       gate_threshold=thr + float(probe.gating.threshold)))
        with torch.no_grad():
            changed = iv.edit(got[LAYER], torch.from_numpy(every.mask), gate_h_BTD=got[LAYER - 1]).changed_B
        if 0 < int(changed.sum()) < n:
            break
    else:
        pytest.fail("no threshold opens the probe gate on some samples only")
    kept = bake_mod._own_samples(lm, n, T, 7, res, iv, batch=5, progress=False)
    assert (kept.tokens == every.tokens[~changed.numpy()]).all()

    pre = lm.tokenizer("a b", add_special_tokens=False).input_ids
    led = bake_mod._own_samples(lm, 3, T, 7, res, Intervention(run, SETTING), prefix="a b", progress=False)
    assert led.tokens.shape == (3, T) and (led.tokens[:, 1:1 + len(pre)] == pre).all()
    with pytest.raises(EvalError, match="leaves nothing to sample"):
        bake_mod._own_samples(lm, 3, 3, 7, res, Intervention(run, SETTING), prefix="a b c d", progress=False)


def test_a_bake_with_own_samples_trains_half_its_retain_rows_on_them_and_keeps_them_for_a_resume(
        store, tmp_path, tiny_model, monkeypatch):
    from pipelines.config import BakeConfig
    from pipelines.errors import EvalError

    fresh = load_model(tiny_model, device="cpu")  # a bake merges into the model it is given
    run = _run(tmp_path, fresh, store)
    cfg = BakeConfig(steps=4, batch_contexts=4, rank=4, multiplier=2.0, forget_weight=1.0)
    train = {"retain": bake_mod._Corpus(np.full((8, 16), 3, np.int32), np.ones((8, 16), bool)),
             "unlearn": bake_mod._Corpus(np.full((8, 16), 4, np.int32), np.ones((8, 16), bool)),
             "samples": bake_mod._Corpus(np.full((6, 16), 5, np.int32), np.ones((6, 16), bool))}
    ids, _, _, unl = bake_mod._batch(train, cfg, 2, 0)
    assert ids[:, 0].tolist() == [3, 3, 5, 5, 4, 4, 4, 4] and unl[:, 0].tolist() == [False] * 4 + [True] * 4

    work = tmp_path / "baked.bake"
    work.mkdir()
    res = bake_mod._Residual(fresh.model, [LAYER])
    made = bake_mod._samples_of(work, False, fresh, 6, "", 0, train, res, Intervention(load_run(run), SETTING),
                                   False)
    assert made.tokens.shape == (6, 16) and (work / bake_mod.SAMPLES).is_file()

    def no_sampling(*a, **k):
        raise AssertionError("a resumed bake samples again")
    monkeypatch.setattr(bake_mod, "_own_samples", no_sampling)
    kept = bake_mod._samples_of(work, True, fresh, 6, "", 0, train, res, None, False)
    assert (kept.tokens == made.tokens).all() and (kept.mask == made.mask).all()
    monkeypatch.undo()
    shutil.rmtree(work)

    with pytest.raises(EvalError, match=r"^own_samples is a number of contexts, got -1$"):
        bake_mod.bake(run, tmp_path / "baked", fresh, cfg, own_samples=-1)
    assert not (tmp_path / "baked").exists() and not work.exists()
    out = bake_mod.bake(run, tmp_path / "baked", fresh, cfg, own_samples=6, progress=False).out_dir
    meta = json.loads((out / bake_mod.BAKE_FILE).read_text())
    assert meta["own_samples"] == 6 and meta["own_samples_kept"] == 6  # gateless: every sample
    assert meta["sample_prefix"] == "" and not work.exists()
