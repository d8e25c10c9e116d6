"""A patched model under transformers tensor parallelism (``tp_plan="auto"``, two CPU processes
over gloo) generates the tokens of a single process (issue 15, item 9).

The check itself is scripts/tp_check.py (it must run as ``torchrun`` workers); this test launches
it and reads its verdict. About 10 s on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="needs torch.distributed with the gloo backend"),
]


def test_tp_plan_auto_matches_single_process():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    # --standalone: a rendezvous on a free local port, so parallel runs do not collide on 29500.
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               str(ROOT / "scripts" / "tp_check.py")]
    out = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    verdict = [line for line in out.stdout.splitlines() if line.startswith("tp_check:")]
    print("\n".join(verdict))
    assert out.returncode == 0, f"tp_check exited {out.returncode}\n{out.stdout}\n{out.stderr[-4000:]}"
    assert verdict and verdict[-1].startswith("tp_check: OK"), out.stdout
