"""Benchmark tools from PyPI, each in its own venv under bench-results/, installed on first use.

smg (``sglang-router``) and py-spy are measuring instruments, not dependencies of the
appliance: they must never change what ``.venv`` resolves, and a machine that cannot install
them still runs everything else. So each gets a venv of its own, created with the system's
``python3 -m venv`` and reused as it is once present (delete the folder to upgrade).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path


def ensure(venv: Path, package: str, pin: str, executable: str) -> tuple[Path | None, str]:
    """``venv/bin/executable``, installing ``package==pin`` first if needed; (None, why)."""
    exe = venv / "bin" / executable
    if exe.exists():
        return exe, ""
    python = shutil.which("python3") or sys.executable
    print(f"installing {package}=={pin} into {venv} (once; reused by later runs)...",
          file=sys.stderr, flush=True)
    steps = [[python, "-m", "venv", str(venv)],
             [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check",
              f"{package}=={pin}"]]
    for step in steps:
        try:
            out = subprocess.run(step, capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return None, f"`{' '.join(step[-2:])}` failed: {exc}"
        if out.returncode != 0:
            last = (out.stderr.strip() or out.stdout.strip()).splitlines()[-1:] or ["?"]
            return None, f"`{' '.join(step[-2:])}` failed: {last[0][:200]}"
    if not exe.exists():
        return None, f"{package} installed no `{executable}` executable"
    return exe, ""


def installed_version(venv: Path, package: str) -> str | None:
    python = venv / "bin" / "python"
    if not python.exists():
        return None
    out = subprocess.run([str(python), "-c",
                          f"import importlib.metadata as m; print(m.version({package!r}))"],
                         capture_output=True, text=True, timeout=60)
    return out.stdout.strip() if out.returncode == 0 else None
