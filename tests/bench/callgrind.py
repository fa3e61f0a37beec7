"""Machine instructions a Python run takes, counted by ``valgrind --tool=callgrind``.

Shared by the scripts that compare code by instructions rather than by CPU time, which moves
10-50 % between runs on a shared VM while these counts repeat to about a percent.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys


def instructions(args: list[str], dump: str = "/dev/null") -> int:
    """Instructions ``python args...`` took, start-up included (compare two runs that differ
    only in their request count to leave it out); the per-function profile goes to ``dump``.
    """
    env = {**os.environ, "PYTHONHASHSEED": "0"}  # dicts collide alike from run to run
    proc = subprocess.run(["valgrind", "--tool=callgrind", f"--callgrind-out-file={dump}",
                           sys.executable, *args], capture_output=True, text=True, check=True,
                          env=env)
    found = re.search(r"Collected : (\d+)", proc.stderr)
    if found is None:
        raise RuntimeError(proc.stderr[-2000:])
    return int(found.group(1))
