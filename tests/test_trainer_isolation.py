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


# What inference reads from trainer/: the SAE (trainer/sae.py and the run folder it is read from,
# trainer/run.py) and the gate's own package (trainer/gate/: the gate and the selection rules).
INFERENCE_MAY_IMPORT = ("trainer.sae", "trainer.run", "trainer.gate")
# ff run trains (workflow.py); ff eval measures the SAE's reconstruction with training's own
# estimator (evaluate.py: trainer/evaluate.py's eval_corpus), beside the inference it evaluates.
NOT_INFERENCE = {"workflow.py": {"trainer.config", "trainer.train", "trainer.errors"},
                 "evaluate.py": {"trainer.evaluate"}}


def _trainer_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "trainer":
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "trainer"}
    return found


def _allowed(module: str) -> bool:
    return any(module == m or module.startswith(m + ".") for m in INFERENCE_MAY_IMPORT)


def test_pipelines_read_only_the_sae_and_the_gate_from_trainer():
    bad, seen = {}, set()
    for path in sorted((ROOT / "pipelines").glob("*.py")):
        mods = _trainer_imports(path)
        seen |= mods
        extra = {m for m in mods if not _allowed(m)} - NOT_INFERENCE.get(path.name, set())
        if extra:
            bad[path.name] = sorted(extra)
    assert not bad, f"pipelines/ imports from trainer/ beyond the SAE and the gate: {bad}"
    assert {"trainer.sae", "trainer.gate.gate", "trainer.gate.select"} <= seen  # the check reads real imports
    assert _trainer_imports(ROOT / "pipelines" / "hf_modeling.py") == set()  # an exported folder's code stands alone
