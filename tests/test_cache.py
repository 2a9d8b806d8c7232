"""ff cache / store tests on a tiny random Gemma 3 model built from a config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from click.testing import CliRunner
from conftest import kill_when, write_corpus

from cache.build import CacheConfig, build_cache, default_layers
from cache.store import from_storage, open_store
from cli import main


def _cfg(tiny_model, tiny_corpora, **kw) -> CacheConfig:
    base = dict(model=tiny_model, layers=(1, 2), retain=tiny_corpora[0], unlearn=tiny_corpora[1],
                contexts=24, unlearn_contexts=16, ctx_len=32, chunk_contexts=4)
    base.update(kw)
    return CacheConfig(**base)


def _arrays(path) -> dict[str, np.ndarray]:
    root = zarr.open_group(str(path), mode="r")
    return {f"{c}/{a}": np.asarray(root[c][a][:]) for c in ("retain", "unlearn") for a in root[c].array_keys()}


def test_store_layout_and_activations_match_hf_forward(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), out, progress=False)
    root = zarr.open_group(str(out), mode="r")
    assert root.attrs["complete"] is True and root.attrs["hook"] == "resid_post"
    assert sorted(root["retain"].array_keys()) == ["digests", "layer_1", "layer_2", "tokens"]
    for name in ("retain", "unlearn"):  # row i: the crc32 of each array's chunk i as it reads back
        g = root[name]
        digests = np.asarray(g["digests"][:])
        assert g["digests"].attrs["columns"] == ["tokens", "layer_1", "layer_2"]
        for i in range(g["tokens"].cdata_shape[0]):
            for k, a in enumerate(["tokens", "layer_1", "layer_2"]):
                block = np.ascontiguousarray(g[a][i * 4:(i + 1) * 4])
                assert digests[i, k] == zlib.crc32(block.tobytes()), (name, i, a)
    assert root["retain/layer_1"].attrs["logical_dtype"] == "bfloat16"
    assert root["retain/layer_1"].dtype == np.uint16 and root["retain/layer_1"].chunks == (4, 32, 32)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()
    store = open_store(out)
    for name in ("retain", "unlearn"):
        c = store.corpus(name)
        ids = torch.from_numpy(c.tokens().astype(np.int64))
        assert (ids[:, 0] == 2).all()  # BOS first
        with torch.inference_mode():
            hs = model(input_ids=ids, output_hidden_states=True).hidden_states
        for layer in (1, 2):
            got = np.concatenate([c.read_chunk(layer, i) for i in range(c.n_chunks)])
            want = hs[layer + 1].numpy()
            # bf16 keeps 8 significant bits: relative rounding error <= 2^-8
            np.testing.assert_allclose(got, want, rtol=2 ** -8, atol=1e-6)
            assert not np.array_equal(got, hs[layer].numpy())


def test_mask_excludes_bos_and_padding(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), out, progress=False)
    c = open_store(out).corpus("retain")
    m = c.mask()
    assert not m[:, 0].any() and m[:, 1:].all()
    assert m.shape == (24, 32)


def test_deterministic(tmp_path, tiny_model, tiny_corpora):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), a, progress=False)
    build_cache(_cfg(tiny_model, tiny_corpora), b, progress=False)
    xa, xb = _arrays(a), _arrays(b)
    assert xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])


def test_rerun_complete_is_noop_and_other_args_refused(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    cfg = _cfg(tiny_model, tiny_corpora)
    build_cache(cfg, out, progress=False)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert build_cache(cfg, out, progress=False).skipped
    with pytest.raises(Exception, match=r"other arguments \(layers: \[1, 2\] in the store, \[1\] now\)"):
        build_cache(_cfg(tiny_model, tiny_corpora, layers=(1,)), out, progress=False)
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert before == after  # nothing touched


def test_overwrite_rebuilds(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), out, progress=False)
    res = build_cache(_cfg(tiny_model, tiny_corpora, layers=(3,)), out, overwrite=True, progress=False)
    assert not res.skipped and open_store(out).meta.layers == (3,)


def test_resume_after_partial_store_equals_uninterrupted(tmp_path, tiny_model, tiny_corpora):
    full, part = tmp_path / "full.zarr", tmp_path / "part.zarr"
    cfg = _cfg(tiny_model, tiny_corpora)
    build_cache(cfg, full, progress=False)
    build_cache(cfg, part, progress=False)
    # Simulate an interruption: no completion flag; retain chunk 2 half written (layer_2 landed,
    # layer_1 and tokens did not); unlearn chunk 3 with every layer written but not its tokens.
    root = zarr.open_group(str(part), mode="r+")
    root.attrs["complete"] = False
    for rel in ("retain/tokens/c/2", "retain/layer_1/c/2", "unlearn/tokens/c/3"):
        for f in (part / rel).rglob("*"):
            if f.is_file():
                f.unlink()
    assert open_store(part).corpus("retain").completed_chunks().tolist() == [True, True, False, True, True, True]
    res = build_cache(cfg, part, progress=False)
    assert res.tokens_done == 2 * 4 * 32  # exactly the two missing chunks were recomputed
    assert open_store(part).meta.complete
    xa, xb = _arrays(full), _arrays(part)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])


def test_kill_9_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    retain = write_corpus(tmp_path / "r.txt", 600, seed=3)
    unlearn = write_corpus(tmp_path / "u.txt", 200, seed=4)
    args = ["cache", "--model", tiny_model, "--layers", "0,1,2,3", "--retain", str(retain), "--unlearn",
            str(unlearn), "--contexts", "240", "--set", "unlearn_contexts=40", "--set", "ctx_len=32",
            "--set", "chunk_contexts=2", "--quiet"]
    killed = tmp_path / "killed.zarr"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "cli", *args, "--out", str(killed)], env=env,
                            cwd=Path(__file__).parent.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    kill_when(proc, lambda: int(open_store(killed).corpus("retain").completed_chunks().sum()), 5)
    store = open_store(killed)
    assert not store.meta.complete and 5 <= store.corpus("retain").completed_chunks().sum() < 120

    runner = CliRunner()
    r = runner.invoke(main, [*args, "--out", str(killed)])
    assert r.exit_code == 0, r.output
    clean = tmp_path / "clean.zarr"
    assert runner.invoke(main, [*args, "--out", str(clean)]).exit_code == 0
    xa, xb = _arrays(clean), _arrays(killed)
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k])
    assert open_store(killed).meta.complete


def test_corrupted_chunk_is_detected(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), out, progress=False)
    f = next(p for p in (out / "retain" / "layer_1" / "c" / "1").rglob("*") if p.is_file())
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF
    f.write_bytes(bytes(data))
    c = open_store(out).corpus("retain")
    c.read_chunk(1, 0)  # other chunks still read
    with pytest.raises(Exception):
        c.read_chunk(1, 1)


def test_storage_roundtrip_bf16():
    from cache.store import to_storage

    x = torch.randn(3, 5, 7) * 100
    back = from_storage(to_storage(x, "bfloat16"), "bfloat16")
    np.testing.assert_array_equal(back, x.to(torch.bfloat16).float().numpy())


def test_default_layers_scale_paper_layers():
    assert default_layers(26) == (5, 12, 19)
    assert default_layers(18) == (3, 8, 13)
    assert default_layers(4) == (1, 2, 3)


def test_inspect_json(tmp_path, tiny_model, tiny_corpora):
    out = tmp_path / "s.zarr"
    build_cache(_cfg(tiny_model, tiny_corpora), out, progress=False)
    r = CliRunner().invoke(main, ["inspect", str(out), "--json"])
    assert r.exit_code == 0, r.output
    d = json.loads(r.output)
    assert d["complete"] and d["layers"] == [1, 2] and d["d_model"] == 32 and d["dtype"] == "bfloat16"
    assert d["corpora"]["retain"]["contexts"] == 24 and d["corpora"]["unlearn"]["tokens"] == 16 * 32
    assert d["corpora"]["retain"]["chunks_done"] == 6
    assert d["compression_ratio"] > 1.0 and d["size_on_disk"] > 0
    text = CliRunner().invoke(main, ["inspect", str(out)]).output
    assert "complete" in text and "layers       1, 2" in text


def test_ff_cache_on_a_complete_store_is_a_no_op_and_other_arguments_one_line(tmp_path, tiny_model, tiny_corpora):
    """Row 27 through the CLI: the same command on a complete store says so, exit 0, and touches
    nothing; other arguments are one `error:` line on stderr, exit 2, and touch nothing."""
    out = tmp_path / "s.zarr"
    args = ["cache", "--model", tiny_model, "--retain", tiny_corpora[0], "--unlearn", tiny_corpora[1],
            "--contexts", "8", "--set", "ctx_len=16", "--layers", "1,2", "--quiet", "--out", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None for p in out.rglob("*")}
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and r.stderr == "", r.output
    assert f"{out}: already complete, nothing to do (use --overwrite to rebuild)" in r.stdout
    other = list(args)
    other[other.index("--layers") + 1] = "1"
    r = CliRunner().invoke(main, other)
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.exit_code == 2 and r.stdout == "" and len(lines) == 1, r.output
    assert lines[0].startswith("error: ") and "other arguments (layers: [1, 2] in the store, [1] now)" in lines[0]
    after = {p: (p.read_bytes(), p.stat().st_mtime_ns) if p.is_file() else None for p in out.rglob("*")}
    assert after == before
