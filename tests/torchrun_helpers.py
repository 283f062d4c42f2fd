"""Start a test file as two gloo ranks under torchrun (a fresh process each: forking the pytest process after torch
has run OpenMP work can hang) and fail with what the ranks printed, not only torchrun's own traceback."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def run_two_ranks(script: str | Path, *arguments: str, timeout: int = 300) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
               *map(str, arguments)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        worker_lines = [line for line in done.stderr.splitlines() if "torch/distributed/elastic" not in line
                        and "torch/distributed/run.py" not in line and "torch/distributed/launcher" not in line]
        printed = "\n".join(worker_lines)
        raise AssertionError(f"torchrun exited with {done.returncode}; the ranks printed:\n{printed[:4000]}\n...\n"
                             f"{printed[-4000:]}\nstdout:\n{done.stdout[-2000:]}")
    return done
