"""SAELens export and generate_pair on the tiny model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from test_pipelines_helpers import make_run, set_encoder_bias, single_thread  # noqa: F401 (autouse fixture)

from cache.models import load_model
from pipelines.config import Setting
from pipelines.errors import EvalError
from pipelines.export import export_saelens
from pipelines.generate import generate_pair
from pipelines.intervene import load_run, select_features


def test_export_round_trip_on_raw_activations(tmp_path):
    run_dir = make_run(tmp_path / "run", 32, 3, "sha256:abc", scale=0.037, model="gemma-3-270m")
    out = export_saelens(run_dir, tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "cfg.json").read_text())
    assert cfg == out.cfg
    assert cfg["architecture"] == "standard" and cfg["d_in"] == 32 and cfg["d_sae"] == 256
    assert cfg["hook_name"] == "blocks.3.hook_resid_post" and cfg["hook_layer"] == 3
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    assert cfg["model_name"] == "google/gemma-3-270m" and cfg["context_size"] == 32
    w = load_file(str(tmp_path / "out" / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in w.items()} == {"W_enc": (32, 256), "b_enc": (256,),
                                                         "W_dec": (256, 32), "b_dec": (32,)}
    run = load_run(run_dir)
    x = torch.randn(50, 32) / run.scale  # raw activations: about unit scale after * scale
    with torch.no_grad():
        f_ff = run.sae.encode(x * run.scale)
        x_hat_ff = run.sae.decode(f_ff) / run.scale
    # SAELens "standard" forward, written out: ReLU((x - b_dec) W_enc + b_enc), f W_dec + b_dec
    f_sl = torch.relu((x - w["b_dec"]) @ w["W_enc"] + w["b_enc"])
    assert (f_ff > 0).any()
    torch.testing.assert_close(f_sl, f_ff, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(f_sl @ w["W_dec"] + w["b_dec"], x_hat_ff, atol=1e-3, rtol=1e-4)
    meta = json.loads((tmp_path / "out" / "ff_meta.json").read_text())
    assert meta["candidates"] == run.features["candidate"].nonzero().flatten().tolist()
    assert meta["scale_folded"] == pytest.approx(0.037)
    with pytest.raises(EvalError, match="not empty"):
        export_saelens(run_dir, tmp_path / "out")
    export_saelens(run_dir, tmp_path / "out", overwrite=True)


def test_generate_pair(tiny_model, tmp_path):
    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, 1, lm.info.weights_hash, n_candidates=200, b_enc=1.0)
    prompt = "<bos> the cell gene protein"
    strong = Setting(gate="none", mode="clamp", multiplier=500.0)
    pair = generate_pair(lm, run_dir, prompt, max_new_tokens=8, setting=strong.to_dict())
    clean, unlearned = pair
    assert isinstance(clean, str) and clean != unlearned
    # with the selected features never firing, both continuations are identical
    S = select_features(load_run(run_dir), Setting(top_n=5))
    set_encoder_bias(run_dir, {int(i): -1e4 for i in S})
    pair = generate_pair(lm, run_dir, prompt, max_new_tokens=8, setting=Setting(gate="none", mode="ablate", top_n=5))
    assert pair.clean == pair.unlearned
    assert generate_pair(lm, run_dir, prompt, max_new_tokens=8).clean == pair.clean  # hooks were removed
    with pytest.raises(EvalError, match="max_new_tokens"):
        generate_pair(lm, run_dir, prompt, max_new_tokens=0)


def test_ff_generate_overrides_fields_of_the_runs_chosen_setting(tiny_model, tmp_path):
    """`ff generate` starts from RUN/unlearning.json's chosen setting; an option changes one field,
    and a new gate or percentile drops the threshold calibrated for the chosen one."""
    from click.testing import CliRunner

    from cli import main

    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, 1, lm.info.weights_hash, n_candidates=200, b_enc=1.0)
    chosen = Setting(gate="sequence", mode="clamp", multiplier=30.0, top_n=10, gate_threshold=0.25)
    (run_dir / "unlearning.json").write_text(json.dumps({"best": {"setting": chosen.to_dict()}}))

    def label(*opts):
        r = CliRunner().invoke(main, ["generate", "--run", str(run_dir), "--model", tiny_model, "--device", "cpu",
                                      "--prompt", "the cell", "--max-new-tokens", "2", *opts])
        assert r.exit_code == 0, r.output
        return "setting:" + r.output.split("setting:", 1)[1].splitlines()[0]  # stderr's progress may precede it

    assert label() == f"setting:   {chosen.label}"
    assert label("--set", "multiplier=3") == f"setting:   {chosen.replace(multiplier=3.0).label}"
    p90 = chosen.replace(gate_percentile=90.0, gate_threshold=None)
    assert label("--set", "gate_percentile=90") == f"setting:   {p90.label}"
    assert label("--set", "gate=none") == f"setting:   {chosen.replace(gate='none', gate_threshold=None).label}"
    # a window keeps the chosen threshold (its units do not depend on the window)
    assert label("--set", "gate_window=4") == f"setting:   {chosen.replace(gate_window=4).label}"
    assert label("--set", "gate_window=none") == f"setting:   {chosen.label}"
    r = CliRunner().invoke(main, ["generate", "--run", str(run_dir), "--prompt", "x", "--set", "gate_window=-3"])
    assert r.exit_code == 2 and "gate_window must be a positive number of tokens or None, got -3" in r.output
    for retired in ("--gate-ramp", "--probe-pool"):  # measured, never chosen, gone (docs/results.md)
        r = CliRunner().invoke(main, ["generate", "--run", str(run_dir), "--prompt", "x", retired, "50"])
        assert r.exit_code == 2 and f"No such option '{retired}'" in r.output


def test_ff_generate_continues_every_prompt_given_and_refuses_none(tiny_model, tmp_path):
    """Several --prompt options and a --prompt @FILE each get their pair of continuations, in the
    order given, under one setting line; no prompt at all is a one-line error."""
    from click.testing import CliRunner

    from cli import main

    lm = load_model(tiny_model, device="cpu")
    run_dir = make_run(tmp_path / "run", lm.info.d_model, 1, lm.info.weights_hash, n_candidates=200, b_enc=1.0)
    (tmp_path / "prompts.txt").write_text("the gene\n\nthe cell protein\n", encoding="utf-8")
    base = ["generate", "--run", str(run_dir), "--model", tiny_model, "--device", "cpu", "--max-new-tokens", "2"]
    r = CliRunner().invoke(main, base + ["--prompt", "the cell", "--prompt", "a protein",
                                         "--prompt", f"@{tmp_path / 'prompts.txt'}"])
    assert r.exit_code == 0, r.output
    out = r.output[r.output.index("setting:"):]
    assert out.count("setting:") == 1
    got = [line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("clean:")]
    want = ["the cell", "a protein", "the gene", "the cell protein"]
    assert [g[: len(w)] for g, w in zip(got, want)] == want and len(got) == 4
    assert sum(line.startswith("unlearned:") for line in out.splitlines()) == 4
    single = CliRunner().invoke(main, base + ["--prompt", "a protein"])
    first = [line for line in single.output.splitlines() if line.startswith(("clean:", "unlearned:"))]
    assert first == [line for line in out.splitlines() if line.startswith(("clean:", "unlearned:"))][2:4]
    r = CliRunner().invoke(main, ["generate", "--run", str(run_dir)])
    assert r.exit_code == 2 and "give a prompt to continue" in r.output and len(r.output.strip().splitlines()) == 1
