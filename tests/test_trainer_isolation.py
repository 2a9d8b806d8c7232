"""Dependency direction (docs/architecture.md, STYLE habit 1): training never imports
`transformers`, and trainer/sae.py imports only torch (plus stdlib; safetensors lazily)."""

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import sys, json
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, {tests!r})
    from test_trainer_store import make_store
    import trainer, trainer.config, trainer.data, trainer.evaluate, trainer.featureforget
    import trainer.run, trainer.sae, trainer.steps, trainer.train, trainer.verify
    from trainer.config import TrainConfig
    from trainer.train import train
    from trainer.sae import SAE
    store = str(make_store({tmp!r} + "/s.zarr"))
    cfg = TrainConfig(expansion=2, n_clusters=2, steps=6, warmup=1, batch_contexts=4,
                      recluster_every=2, importance_batches=1, log_every=2, checkpoint_every=3,
                      buffer_chunks=2, eval_frac=0.2)
    train(cfg, store, 1, {tmp!r} + "/run", progress=False)
    SAE.from_run({tmp!r} + "/run")
    print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "transformers")))
""")


def test_training_leaves_transformers_unimported(tmp_path):
    code = SCRIPT.format(tests=str(ROOT / "tests"), tmp=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_sae_module_imports_only_torch_at_top_level():
    tree = ast.parse((ROOT / "trainer" / "sae.py").read_text())
    top = set()
    for node in tree.body:  # module level only: safetensors is imported inside functions
        if isinstance(node, ast.Import):
            top |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            top.add((node.module or "").split(".")[0])
    assert top - {"__future__", "json", "pathlib", "typing"} == {"torch"}
