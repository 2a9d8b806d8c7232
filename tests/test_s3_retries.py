"""Transient object-store errors (503 SlowDown, 500 InternalError on a share of requests, from a
proxy in front of the local S3 server: conftest.FlakyS3Proxy): `ff cache` and `ff train` retry
(botocore's standard mode, cache/location.py S3_RETRIES) and end equal to a run without errors;
when every request fails, the command stops with one line naming the object, and rerunning once
the store answers again finishes the same store."""
from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import FlakyS3Proxy, assert_same_store

from cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _cache(tiny_model, corpora, out, *extra) -> list[str]:
    return ["cache", "--model", tiny_model, "--layers", "1,2", "--retain", str(corpora[0]), "--unlearn",
            str(corpora[1]), "--contexts", "24", "--set", "unlearn_contexts=16", "--set", "ctx_len=32",
            "--set", "chunk_contexts=4", "--quiet", "--out", str(out), *extra]


TRAIN = ["--layer", "1", "--set", "steps=4", "--set", "expansion=2", "--set", "n_clusters=2",
         "--set", "batch_contexts=4", "--set", "warmup=1", "--quiet"]


@pytest.fixture
def flaky(s3_server, s3_bucket):
    proxy = FlakyS3Proxy(s3_server, share=0.05, seed=1)
    yield proxy
    proxy.close()


@pytest.mark.slow
def test_cache_and_train_through_transient_errors_equal_a_clean_run(tmp_path, tiny_model, tiny_corpora,
                                                                     s3_bucket, flaky):
    opts = ["--storage-options", json.dumps({"endpoint_url": flaky.url})]
    url = f"{s3_bucket}/flaky.zarr"
    runner = CliRunner()
    r = runner.invoke(main, [*_cache(tiny_model, tiny_corpora, url), *opts])
    assert r.exit_code == 0, r.output
    local = tmp_path / "local.zarr"
    assert runner.invoke(main, _cache(tiny_model, tiny_corpora, local)).exit_code == 0
    failed_while_caching = flaky.failed
    assert failed_while_caching >= 5  # the errors were there, and retried
    flaky.share = 0.15  # training makes fewer requests: enough failures that some surely land there
    r = runner.invoke(main, ["train", "--store", url, "--out", str(tmp_path / "run-s3"), *TRAIN, *opts])
    assert r.exit_code == 0, r.output
    assert flaky.failed > failed_while_caching
    r = runner.invoke(main, ["train", "--store", str(local), "--out", str(tmp_path / "run-local"), *TRAIN])
    assert r.exit_code == 0, r.output
    for name in ("sae.safetensors", "features.safetensors"):
        assert (tmp_path / "run-s3" / name).read_bytes() == (tmp_path / "run-local" / name).read_bytes(), name
    flaky.share = 0.0
    assert_same_store(local, url)


@pytest.mark.slow
def test_when_retries_run_out_one_line_names_the_object_and_a_rerun_finishes(tmp_path, tiny_model, tiny_corpora,
                                                                              s3_bucket, flaky):
    fast = {"endpoint_url": flaky.url, "config_kwargs": {"retries": {"mode": "standard", "max_attempts": 2}}}
    opts = ["--storage-options", json.dumps(fast)]
    url = f"{s3_bucket}/outage.zarr"
    flaky.share, flaky.fail_after = 0.0, 60  # the store answers, then stops answering
    r = CliRunner().invoke(main, [*_cache(tiny_model, tiny_corpora, url), *opts])
    assert r.exit_code == 2, r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip() and "Loading weights" not in ln]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    assert lines[0].startswith("error: cannot ") and f"'{url}/" in lines[0], lines[0]
    assert "the object store kept failing after retries" in lines[0] and "rerun the command" in lines[0]
    flaky.share, flaky.fail_after = 0.0, None  # it answers again
    r = CliRunner().invoke(main, [*_cache(tiny_model, tiny_corpora, url), *opts])
    assert r.exit_code == 0, r.output
    local = tmp_path / "local.zarr"
    assert CliRunner().invoke(main, _cache(tiny_model, tiny_corpora, local)).exit_code == 0
    assert_same_store(local, url)
