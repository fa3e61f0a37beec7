"""Shared by the booted-systemd modules: the wheels and the offline wheelhouse, built once.

A plugin module (listed in tests/conftest.py's ``pytest_plugins``), not a conftest.py: a second
conftest module would shadow ``tests/conftest.py`` for the modules that import from it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def build_wheel(tree: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w",
                    str(out), str(tree)], check=True, capture_output=True, timeout=300)


def variant(tmp: Path, version: str, broken: bool = False) -> Path:
    """A copy of the source tree with another version; ``broken`` crashes when serving.

    The broken build still passes ``check-config``, so upgrade.sh has to notice it only
    when the service does not become healthy, and roll back.
    """
    tree = tmp / f"src-{version}"
    tree.mkdir()
    for part in ("app", "pipeline", "pyproject.toml", "README.md", "LICENSE", "setup.cfg"):
        src = REPO / part
        if src.is_dir():
            shutil.copytree(src, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tree / part)
    py = tree / "pyproject.toml"
    py.write_text(re.sub(r'^version = ".*"', f'version = "{version}"', py.read_text(), count=1,
                         flags=re.M))
    if broken:
        cli = tree / "app" / "cli.py"
        head = "def serve(path: str, host: str | None, port: int | None, watch: bool) -> int:\n"
        text = cli.read_text()
        assert head in text
        cli.write_text(text.replace(
            head, head + "    raise SystemExit('this build is broken on purpose')\n", 1))
    return tree


@pytest.fixture(scope="session")
def artifacts(tmp_path_factory):
    """Wheels 0.1.0 (this tree), 0.1.1, a broken 0.1.2, and an offline wheelhouse."""
    tmp = tmp_path_factory.mktemp("artifacts")
    wheels = tmp / "wheels"
    build_wheel(REPO, wheels)
    build_wheel(variant(tmp, "0.1.1"), wheels)
    build_wheel(variant(tmp, "0.1.2", broken=True), wheels)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:",
                    "-d", str(tmp / "wheelhouse"),
                    str(wheels / "ollama_load_balancer-0.1.0-py3-none-any.whl")],
                   check=True, capture_output=True, timeout=300)
    while missing := wanted_by_the_container(tmp / "wheelhouse"):
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--only-binary=:all:", "-d", str(tmp / "wheelhouse"), *missing],
                       check=True, capture_output=True, timeout=300)
    return tmp


CONTAINER_PYTHON = {"python_full_version": "3.11.2", "python_version": "3.11", "extra": ""}


def wanted_by_the_container(wheelhouse: Path) -> list[str]:
    """Requirements Debian 12's Python (3.11.2) needs that the wheelhouse lacks.

    pip evaluates environment markers with the Python it runs on (newer here), so a backport
    such as ``async-timeout; python_full_version < "3.11.3"`` would be left out.
    """
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    have = {canonicalize_name(w.name.split("-")[0]) for w in wheelhouse.glob("*.whl")}
    missing: set[str] = set()
    for wheel in wheelhouse.glob("*.whl"):
        with zipfile.ZipFile(wheel) as z:
            meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
            lines = z.read(meta).decode().splitlines()
        for line in lines:
            if not line.startswith("Requires-Dist:"):
                continue
            req = Requirement(line.split(":", 1)[1])
            if (req.marker is not None and req.marker.evaluate(CONTAINER_PYTHON)
                    and canonicalize_name(req.name) not in have):
                missing.add(f"{req.name}{req.specifier}")
    return sorted(missing)
