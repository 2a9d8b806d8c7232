"""Shared fixtures: a tiny random Gemma 3 model with a word-level tokenizer, built offline."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Callable

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = ("the a cell gene protein virus plant animal city river music game law trade market "
         "blood enzyme tissue bacteria species car house road ship paper book song art war "
         "king queen money bank school teacher student computer engine water fire earth").split()


def write_corpus(path: Path, n_docs: int, seed: int, words=WORDS) -> Path:
    import random

    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n_docs):
            f.write(" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) + "\n")
    return path


def build_tiny_model(folder: Path, n_layers: int = 4, hidden: int = 32) -> Path:
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<bos>", eos_token="<eos>",
                                  pad_token="<pad>", unk_token="<unk>")
    cfg = Gemma3TextConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=2 * hidden,
                           num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                           head_dim=16, sliding_window=16, max_position_embeddings=512,
                           pad_token_id=0, eos_token_id=1, bos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


D, CTX, BOS, PAD = 8, 6, 2, 0
"""Shapes and special tokens of `make_store` stores."""
SENTINEL_BOS, SENTINEL_PAD = 1e4, -1e4  # any of these in a batch means the mask leaked


def make_store(path, *, model_hash="h1", d_model=D, layers=(1, 2), n_retain=40, n_unlearn=24,
               chunk_contexts=4, complete=True, seed=0, dtype="float32", **more_attrs):
    """A tiny store written directly (no model): random activations, BOS/padding sentinels,
    tokens in [3, 100). `more_attrs` go into the root attributes (e.g. vocab_size)."""
    import numpy as np

    from cache.store import create_store, to_storage, write_digests

    attrs = dict(**more_attrs, format_version=1, model="tiny", model_hash=model_hash,
                 tokenizer_hash="t", ctx_len=CTX, layers=list(layers), hook="resid_post",
                 d_model=d_model, dtype=dtype, chunk_contexts=chunk_contexts, bos_token_id=BOS,
                 pad_token_id=PAD, ff_version="test")
    sizes = {"retain": n_retain, "unlearn": n_unlearn}
    corpora = {k: dict(n_contexts=n, corpus=k, fingerprint=k) for k, n in sizes.items()}
    root = create_store(path, attrs, corpora)
    rng = np.random.default_rng(seed)
    for name, n in sizes.items():
        tok = rng.integers(3, 100, size=(n, CTX)).astype(np.int32)
        tok[:, 0] = BOS
        tok[-1, -2:] = PAD  # padding at the end of the last context
        for layer in layers:
            x = rng.normal(size=(n, CTX, d_model)).astype(np.float32)
            x *= 3.0 if name == "unlearn" else 1.0
            x[:, 0] = SENTINEL_BOS
            x[tok == PAD] = SENTINEL_PAD
            root[name][f"layer_{layer}"][:] = to_storage(x, dtype)
        root[name]["tokens"][:] = tok
        g = root[name]
        for i, start in enumerate(range(0, n, chunk_contexts)):  # as cache.store's writer records them
            rows = slice(start, start + chunk_contexts)
            write_digests(g, i, {a: np.asarray(g[a][rows]) for a in g.array_keys() if a != "digests"})
    root.attrs.update({"complete": complete})
    return path


def store_contents(location) -> tuple[dict, dict]:
    """Root attributes and every array (numpy) of the store at a folder or URL."""
    import numpy as np
    import zarr

    from cache.location import store_like

    root = zarr.open_group(store_like(location, read_only=True), mode="r")
    arrays = {f"{c}/{a}": np.asarray(root[c][a][:]) for c in ("retain", "unlearn")
              for a in root[c].array_keys()}
    return dict(root.attrs), arrays


def assert_same_store(a, b) -> None:
    """Two stores hold equal root attributes and equal arrays."""
    import numpy as np

    (attrs_a, xa), (attrs_b, xb) = store_contents(a), store_contents(b)
    assert attrs_a == attrs_b and xa.keys() == xb.keys()
    for k in xa:
        np.testing.assert_array_equal(xa[k], xb[k], err_msg=k)


@pytest.fixture(autouse=True)
def _forget_storage_options():
    """`--storage-options` of a CLI call stays set in the process (cache.location): clear it
    after each test so that no test sees another's."""
    yield
    from cache.location import use_storage_options

    use_storage_options(None)


@pytest.fixture
def one_thread():
    """Tiny tensors: extra torch threads only add contention (use with pytest.mark.usefixtures)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    return str(build_tiny_model(tmp_path_factory.mktemp("tiny_model")))


@pytest.fixture(scope="session")
def tiny_corpora(tmp_path_factory) -> tuple[str, str]:
    d = tmp_path_factory.mktemp("corpora")
    retain = write_corpus(d / "retain.txt", 400, seed=1, words=WORDS[:16] + WORDS[20:])
    unlearn = write_corpus(d / "unlearn.txt", 400, seed=2, words=WORDS[:12] + WORDS[16:20])
    return str(retain), str(unlearn)


S3_SECRET = "ff-test-secret-4f1c9a"
"""The secret access key the S3 tests use: it must never appear in a store, a run folder or output."""


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server (moto's server mode) on a free port of 127.0.0.1 -> its URL."""
    pytest.importorskip("s3fs")
    moto_server = pytest.importorskip("moto.server")
    import logging
    import socket

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_server, monkeypatch, request) -> str:
    """A fresh bucket on the test server, credentials and endpoint in the standard AWS
    environment variables (as a user would set them) -> "s3://<bucket>"."""
    import re

    import boto3

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "ff-test-key-id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_SECRET)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    name = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:50].strip("-")
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def kill_when(proc: subprocess.Popen, written: Callable[[], int], n: int, *, timeout: float = 120.0,
              what: str = "the run") -> None:
    """SIGKILL `proc` as soon as `written()` (e.g. chunks in the store) reaches n; `written` may
    raise while the store is still being created. Fails if the process ends first."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        try:
            if written() >= n:
                break
        except Exception:
            continue
    assert proc.poll() is None, f"{what} finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


class FlakyS3Proxy:
    """An HTTP proxy in front of the test S3 server that answers a share of requests with a
    transient error (503 SlowDown, or 500 InternalError) instead of forwarding them: what a busy
    or flaky object store does. `share` may be changed while it runs; `failed` counts."""

    def __init__(self, upstream: str, share: float, seed: int = 0):
        import http.client
        import http.server
        import random
        import socketserver
        import threading
        from urllib.parse import urlsplit

        self.share, self.failed, self.forwarded = share, 0, 0
        self.fail_after: int | None = None
        """Once this many requests were forwarded, every later one fails (retries run out)."""
        rng, lock, proxy = random.Random(seed), threading.Lock(), self
        host, port = urlsplit(upstream).hostname, urlsplit(upstream).port

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    out = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0], 16)
                        chunk = self.rfile.read(size + 2)[:size]
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b""):
                                pass
                            return out
                        out += chunk
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _handle(self):
                body = self._body()
                with lock:
                    if proxy.fail_after is not None and proxy.forwarded >= proxy.fail_after:
                        proxy.share = 1.0
                    fail = rng.random() < proxy.share
                    proxy.failed += fail
                    proxy.forwarded += not fail
                if fail:
                    code, name = rng.choice([(503, "SlowDown"), (500, "InternalError")])
                    msg = f"<?xml version='1.0'?><Error><Code>{name}</Code><Message>injected</Message></Error>".encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(msg)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(msg)
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() != "transfer-encoding"}
                headers["Content-Length"] = str(len(body))
                conn = http.client.HTTPConnection(host, port, timeout=60)
                conn.request(self.command, self.path, body=body if body or self.command in ("PUT", "POST") else None,
                             headers=headers)
                r = conn.getresponse()
                data = r.read()
                self.send_response(r.status)
                for k, v in r.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
