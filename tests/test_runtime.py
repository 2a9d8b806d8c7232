"""cache/runtime.py: with freed memory kept in the heap, a large block made and freed again and
again is mapped once; without it (FF_KEEP_FREED_MEMORY=0, or glibc's default) every time."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {root!r})
    import torch
    from cache.runtime import keep_freed_memory
    kept = keep_freed_memory()
    for _ in range(5):  # 64 MiB a few times while the heap takes its shape, then ten times more
        torch.ones(64 << 18).sum()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(64 << 18).sum()
    print(json.dumps({{"kept": kept, "faults": resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before}}))
""")


def _faults(env_value: str) -> dict:
    env = {**os.environ, "FF_KEEP_FREED_MEMORY": env_value}
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(root=str(ROOT))], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_a_freed_block_is_reused_instead_of_mapped_again():
    pages = (64 << 20) // os.sysconf("SC_PAGE_SIZE")
    off, on = _faults("0"), _faults("1")
    assert off["kept"] is False and on["kept"] is True
    assert off["faults"] >= 9 * pages  # each 64 MiB block faulted in again
    # mapped once, then reused: at most a few of the ten blocks fault in again (0 in most runs, 3 in
    # about one in five on a 2-core CI machine, 60 runs), against every one of them without it
    assert on["faults"] < 5 * pages
