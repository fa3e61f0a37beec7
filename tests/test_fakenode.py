"""The simulated Ollama node on its own: no appliance in between, real sockets, real clients.

The node is the judge of what Ollama would see in every other test, so it must stand apart
from the appliance (no shared code) and follow the reference's shapes itself.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest
import requests

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


# --- the HTTP control routes are off unless asked for --------------------------------------------

GEN = {"model": "m", "prompt": "hi", "stream": False}


def test_control_routes_answer_404_unless_the_fault_api_is_on(fake_node):
    node = fake_node(["m"])
    r = requests.post(f"{node.url}/_fake/fault", json={"mode": "500"}, timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")
    assert r.headers["Content-Type"].startswith("text/plain")
    assert requests.get(f"{node.url}/_fake/stats", timeout=5).status_code == 404
    assert node.node.fault == "none"  # the request changed nothing
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200


def test_the_fault_api_sets_a_counted_fault_over_http(fake_node):
    node = fake_node(["m"], fault_api=True)
    r = requests.post(f"{node.url}/_fake/fault", json={"mode": "500", "count": 1}, timeout=5)
    assert (r.status_code, r.json()) == (200, {"fault": "500"})
    first = requests.post(f"{node.url}/api/generate", json=GEN, timeout=5)
    assert first.status_code == 500 and "runner" in first.json()["error"]
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200
    stats = requests.get(f"{node.url}/_fake/stats", timeout=5).json()
    assert stats["by_path"]["/api/generate"] == 2 and stats["fault"] == "500"
    bad = requests.post(f"{node.url}/_fake/fault", json={"mode": "melt"}, timeout=5)
    assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]


def test_in_process_set_fault_works_without_the_fault_api(fake_node):
    node = fake_node(["m"])
    node.node.set_fault("503", count=1)
    busy = requests.post(f"{node.url}/api/generate", json=GEN, timeout=5)
    assert busy.status_code == 503 and busy.json()["error"].startswith("server busy")
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200
    with pytest.raises(ValueError, match="unknown fault"):
        node.node.set_fault("melt")


def _start_command(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """``ollama-lb fake-node`` on port 0; returns the process and the URL it printed."""
    p = subprocess.Popen([sys.executable, "-m", "app", "fake-node", "--port", "0", "--models",
                          "tiny", "--profile", "fast", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline() if p.stdout else ""
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    if match is None:
        p.kill()
        p.wait(timeout=10)
        pytest.fail(f"fake-node printed no URL: {line!r}")
    return p, match.group(0)


@pytest.mark.parametrize(("flag", "status"), [((), 404), (("--fault-api",), 200)])
def test_fake_node_command_serves_the_control_routes_only_with_fault_api(flag, status):
    p, url = _start_command(*flag)
    try:
        r = requests.post(f"{url}/_fake/fault", json={"mode": "503", "count": 1}, timeout=5)
        assert r.status_code == status
        gen = requests.post(f"{url}/api/generate", json={**GEN, "model": "tiny"}, timeout=5)
        assert gen.status_code == (503 if status == 200 else 200)
    finally:
        p.terminate()
        p.wait(timeout=10)
