"""The simulated Ollama node on its own: no appliance in between, real sockets, real clients.

The node is the judge of what Ollama would see in every other test, so it must stand apart
from the appliance (no shared code) and follow the reference's shapes itself.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from app.fakenode import names

FAKENODE = Path(__file__).resolve().parent.parent / "app" / "fakenode"


def _imported_modules(source: str, package: str) -> list[str]:
    """What a module of ``package`` imports: ``from X import y`` counts as ``X.y``, and
    relative imports are resolved against the package."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [f"{base}.{alias.name}" for alias in node.names]
    return out


def test_the_simulator_shares_no_code_with_the_appliance():
    sources = sorted(FAKENODE.rglob("*.py"))
    assert len(sources) > 5  # the walk really found the package
    offenders = []
    for path in sources:
        package = ".".join(path.relative_to(FAKENODE.parent.parent).parent.parts)
        for module in _imported_modules(path.read_text(), package):
            top = module.split(".")[0]
            if top == "pipeline" or (top == "app" and not module.startswith("app.fakenode.")):
                offenders.append(f"{path.relative_to(FAKENODE)} imports {module}")
    assert not offenders, offenders


def test_the_import_check_sees_what_it_must_reject():
    source = ("import pipeline.ring\nfrom app import netutil\nfrom .. import server\n"
              "from . import names\nfrom app.fakenode.sim import Profile\n")
    assert _imported_modules(source, "app.fakenode") == [
        "pipeline.ring", "app.netutil", "app.server", "app.fakenode.names",
        "app.fakenode.sim.Profile"]


@pytest.mark.parametrize(("given", "short", "owner"), [
    ("llama3.2", "llama3.2:latest", "library"),
    ("LLAMA3.2:Latest", "llama3.2:latest", "library"),
    ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest", "library"),
    ("me/tiny", "me/tiny:latest", "me"),
    ("localhost:5000/me/tiny:q4", "localhost:5000/me/tiny:q4", "me"),
])
def test_model_names_follow_the_references_rules(given, short, owner):
    assert names.short(given) == short
    assert names.namespace_of(given) == owner
    assert names.key(given) == names.key(short)  # one model, whichever way it is written
    assert names.is_valid(given)


@pytest.mark.parametrize("bad", ["", "llama3.2:", "/llama3.2", "me/", "a/b/c/d", "bad name",
                                 "-dash", "dotted.ns/model", "x" * 81])
def test_invalid_model_names_are_rejected(bad):
    assert not names.is_valid(bad)
