"""The deploy scripts on a booted systemd: install, reload, restart, upgrade, rollback, uninstall.

One container runs the whole scenario in order (each step builds on the one before), as an
operator would on a fresh VM. Skipped, with the reason, where the machine cannot boot one.
"""

from __future__ import annotations

import json
import re
import socket
import ssl
import sys
import time
from pathlib import Path

import gevent
import ollama
import pytest
import requests
import vm as vmlib
import yaml

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(600),
              pytest.mark.skipif(vmlib.why_not() is not None, reason=str(vmlib.why_not()))]

REPO = Path(__file__).resolve().parents[2]
SRC = "/mnt/src"
DEPLOY = "/mnt/deploy"
WHEEL = f"{SRC}/wheels/ollama_load_balancer-0.1.0-py3-none-any.whl"
CONFIG = "/etc/ollama-lb/config.yaml"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vm(artifacts, tmp_path_factory):
    machine = vmlib.VM(tmp_path_factory.mktemp("vm") / "root",
                       {str(artifacts): SRC, str(REPO / "deploy"): DEPLOY})
    yield machine
    machine.stop()


@pytest.fixture(scope="module")
def nodes():
    """Two simulated Ollama nodes on the host's loopback, seen by the container too."""
    from app.fakenode import FakeNodeServer, make_profile

    started = [FakeNodeServer(["llama3.2"], make_profile("fast")).start() for _ in range(2)]
    yield started
    for n in started:
        n.stop()


@pytest.fixture(scope="module")
def port():
    return free_port()


def install(vm, *extra, check=True):
    return vm.run("bash", f"{DEPLOY}/install.sh", "--wheel", WHEEL, "--wheelhouse",
                  f"{SRC}/wheelhouse", *extra, timeout=300, check=check)


def config_for(nodes, port, count=1, tls=False):
    server = {"host": "127.0.0.1", "port": port, "drainSeconds": 5}
    if tls:  # the paths install.sh --tls-cert/--tls-key installs to
        server["tls"] = {"certFile": "/etc/ollama-lb/tls/cert.pem",
                         "keyFile": "/etc/ollama-lb/tls/key.pem"}
    return yaml.safe_dump({
        "server": server,
        "nodes": [{"id": f"node-{i}", "url": n.url} for i, n in enumerate(nodes[:count])],
        "healthCheck": {"intervalMs": 500}})


def certs_module():
    """tests/certs.py (certificates made with openssl), from beside this directory."""
    sys.path.insert(0, str(REPO / "tests"))
    import certs

    return certs


def presented(port: int, ctx: ssl.SSLContext) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        return tls.getpeercert(binary_form=True)


def healthy(port, timeout=20):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(f"http://127.0.0.1:{port}/health/live", timeout=1).ok:
                return True
        except requests.RequestException:
            pass
        gevent.sleep(0.2)
    return False


class ClientLoop:
    """Clients sending short requests back to back until stopped; every outcome is kept.

    Half use a kept-alive session, half a new connection per request; some stream. Every
    request is much shorter than the drain bound, so none may fail across a restart.
    """

    def __init__(self, port: int, clients: int = 4) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.ok = 0
        self.failures: list[str] = []
        self.running = True
        self.jobs = [gevent.spawn(self._client, i) for i in range(clients)]

    def _client(self, i: int) -> None:
        session = requests.Session() if i % 2 else None
        deadline = time.monotonic() + 300
        while self.running and time.monotonic() < deadline:
            try:
                self._one(session or requests, stream=i >= 2)
                self.ok += 1
            except Exception as exc:  # every kind of failure counts
                self.failures.append(f"client {i}: {exc!r}")

    def _one(self, http, stream: bool) -> None:
        body = {"model": "llama3.2", "prompt": "hi", "stream": stream}
        r = http.post(f"{self.url}/api/generate", json=body, timeout=60, stream=stream)
        assert r.status_code == 200, f"HTTP {r.status_code}: {r.text[:200]}"
        lines = [json.loads(line) for line in r.iter_lines() if line]
        assert lines and lines[-1].get("done") is True, lines[-1:]

    def served(self, at_least: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        start = self.ok
        while self.ok < start + at_least and time.monotonic() < deadline:
            gevent.sleep(0.05)
        assert self.ok >= start + at_least, f"only {self.ok - start} requests served"

    def stop(self) -> None:
        self.running = False
        gevent.joinall(self.jobs, timeout=90)


def restarted_without_a_failure(vm, port, action) -> None:
    """Run ``action`` while clients send requests: a new process, nothing refused or failed."""
    pid = vm.main_pid()
    clients = ClientLoop(port)
    try:
        clients.served(20)
        action()
        clients.served(20)  # the new process serves
    finally:
        clients.stop()
    assert vm.main_pid() not in (0, pid)
    assert clients.failures == [], clients.failures[:5]
    journal = vm.run("journalctl", "-u", "ollama-lb", "-o", "cat", "--no-pager").stdout
    stopped = [json.loads(line) for line in journal.splitlines()
               if line.startswith("{") and '"event": "stopped"' in line]
    assert stopped and stopped[-1]["cut_requests"] == 0  # all drained within the bound


def test_01_fresh_install_writes_the_example_config_and_enables_the_unit(vm):
    out = install(vm, "--no-start")
    assert "writing /etc/ollama-lb/config.yaml from the example" in out.stdout
    assert vm.read(CONFIG) == (Path(REPO) / "deploy" / "config.example.yaml").read_text()
    assert vm.run("systemctl", "is-enabled", "ollama-lb").stdout.strip() == "enabled"
    assert vm.run("systemctl", "is-enabled", "ollama-lb.socket").stdout.strip() == "enabled"
    dropin = vm.read("/etc/systemd/system/ollama-lb.socket.d/listen.conf")
    assert "ListenStream=0.0.0.0:8080" in dropin and "Backlog=1024" in dropin  # the example
    assert vm.run("stat", "-c", "%U:%G %a", CONFIG).stdout.split() == ["root:ollama-lb", "640"]
    assert vm.run("readlink", "/opt/ollama-lb/current").stdout.strip().endswith("/0.1.0")


def test_02_install_again_keeps_the_operators_config_and_serves(vm, nodes, port):
    vm.write(CONFIG, "# edited by the operator\n" + config_for(nodes, port))
    out = install(vm)
    assert "keeping the existing /etc/ollama-lb/config.yaml" in out.stdout
    assert vm.read(CONFIG).startswith("# edited by the operator")
    assert vm.run("systemctl", "is-active", "ollama-lb").stdout.strip() == "active"
    assert f"ListenStream=127.0.0.1:{port}" in vm.read(
        "/etc/systemd/system/ollama-lb.socket.d/listen.conf")  # followed the config
    journal = vm.run("journalctl", "-u", "ollama-lb", "-o", "cat", "--no-pager").stdout
    started = [json.loads(line) for line in journal.splitlines()
               if line.startswith("{") and '"event": "started"' in line]
    assert started[-1]["socket"] == "systemd" and started[-1]["port"] == port  # taken over
    reply = ollama.Client(host=f"http://127.0.0.1:{port}").generate(model="llama3.2",
                                                                    prompt="hello")
    assert reply.done and reply.response
    assert nodes[0].stats.by_path.get("/api/generate", 0) >= 1


def test_03_service_runs_hardened_as_its_own_user(vm):
    pid = vm.main_pid()
    status = vm.run("cat", f"/proc/{pid}/status").stdout
    assert re.search(r"^CapEff:\s+0+$", status, re.M)
    assert re.search(r"^NoNewPrivs:\s+1$", status, re.M)
    assert vm.run("ps", "-o", "user=", "-p", str(pid)).stdout.strip() == "ollama-lb"
    limits = vm.run("cat", f"/proc/{pid}/limits").stdout
    nofile = int(re.search(r"Max open files\s+(\d+)", limits).group(1))
    assert nofile >= 20000  # 65536 on a VM; nspawn caps the hard limit at 20000


def test_04_config_edit_reloads_without_restart(vm, nodes, port):
    pid = vm.main_pid()
    vm.write(CONFIG, config_for(nodes, port, count=2))
    deadline = time.monotonic() + 10
    ids = []
    while time.monotonic() < deadline:
        ids = [n["id"] for n in requests.get(f"http://127.0.0.1:{port}/admin/nodes",
                                             timeout=2).json()["nodes"]]
        if ids == ["node-0", "node-1"]:
            break
        gevent.sleep(0.2)
    assert ids == ["node-0", "node-1"]
    assert vm.main_pid() == pid


def test_05_systemctl_reload_sends_sighup(vm, port):
    pid = vm.main_pid()
    vm.run("systemctl", "reload", "ollama-lb")
    journal = vm.run("journalctl", "-u", "ollama-lb", "-o", "cat", "--no-pager").stdout
    assert any('"trigger": "SIGHUP"' in line and '"result": "applied"' in line
               for line in journal.splitlines())
    assert vm.main_pid() == pid and healthy(port)


def test_06_killed_service_is_restarted(vm, port):
    pid = vm.main_pid()
    vm.run("kill", "-9", str(pid))
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and vm.main_pid() in (0, pid):
        gevent.sleep(0.2)
    assert vm.main_pid() not in (0, pid)
    assert healthy(port)


def test_07_systemctl_restart_refuses_and_fails_no_request(vm, port):
    restarted_without_a_failure(vm, port, lambda: vm.run("systemctl", "restart", "ollama-lb"))


def test_08_upgrade_switches_release_and_fails_no_request(vm, port):
    restarted_without_a_failure(vm, port, lambda: vm.run(
        "bash", f"{DEPLOY}/upgrade.sh", "--wheel",
        f"{SRC}/wheels/ollama_load_balancer-0.1.1-py3-none-any.whl", "--wheelhouse",
        f"{SRC}/wheelhouse", timeout=300))
    assert vm.run("readlink", "/opt/ollama-lb/current").stdout.strip().endswith("/0.1.1")
    assert healthy(port)


def test_09_broken_upgrade_rolls_back_by_itself(vm, port):
    out = vm.run("bash", f"{DEPLOY}/upgrade.sh", "--wheel",
                 f"{SRC}/wheels/ollama_load_balancer-0.1.2-py3-none-any.whl", "--wheelhouse",
                 f"{SRC}/wheelhouse", "--timeout", "8", timeout=300, check=False)
    assert out.returncode != 0 and "rolling back" in out.stderr
    assert vm.run("readlink", "/opt/ollama-lb/current").stdout.strip().endswith("/0.1.1")
    assert healthy(port)


def test_10_rollback_returns_to_the_previous_release(vm, port):
    vm.run("bash", f"{DEPLOY}/rollback.sh", "--to", "0.1.0", timeout=120)
    assert vm.run("readlink", "/opt/ollama-lb/current").stdout.strip().endswith("/0.1.0")
    assert healthy(port)
    reply = requests.post(f"http://127.0.0.1:{port}/api/generate", timeout=10,
                          json={"model": "llama3.2", "prompt": "x", "stream": False})
    assert reply.ok and json.loads(reply.content)["done"]


def test_11_tls_files_installed_for_the_service_and_renewed_without_a_restart(
        vm, nodes, port, artifacts):
    certs = certs_module()
    if certs.WHY_NOT:
        pytest.skip(certs.WHY_NOT)
    ca = certs.make_ca(artifacts / "pki", "vm-ca")  # artifacts are /mnt/src in the container
    for name in ("first", "renewed"):
        ca.issue(name)
    vm.write(CONFIG, config_for(nodes, port, tls=True))  # the operator turns HTTPS on
    out = install(vm, "--tls-cert", f"{SRC}/pki/first.pem", "--tls-key", f"{SRC}/pki/first.key")
    assert "installed /etc/ollama-lb/tls/cert.pem" in out.stdout
    assert "HTTPS, files in /etc/ollama-lb/tls" in out.stdout
    assert vm.run("stat", "-c", "%U:%G %a", "/etc/ollama-lb/tls", "/etc/ollama-lb/tls/key.pem",
                  ).stdout.split() == ["root:ollama-lb", "750", "root:ollama-lb", "640"]
    ctx = ssl.create_default_context(cafile=str(ca.cert))
    reply = ollama.Client(host=f"https://127.0.0.1:{port}", verify=ctx).generate(
        model="llama3.2", prompt="hello")  # the hardened service reads its key
    assert reply.done
    assert presented(port, ctx) == ssl.PEM_cert_to_DER_cert(
        (artifacts / "pki" / "first.pem").read_text())

    pid = vm.main_pid()
    vm.run("bash", f"{DEPLOY}/install.sh", "--tls-only", "--tls-cert",
           f"{SRC}/pki/renewed.pem", "--tls-key", f"{SRC}/pki/renewed.key", timeout=120)
    renewed = ssl.PEM_cert_to_DER_cert((artifacts / "pki" / "renewed.pem").read_text())
    deadline = time.monotonic() + 15
    while presented(port, ctx) != renewed and time.monotonic() < deadline:
        gevent.sleep(0.2)
    assert presented(port, ctx) == renewed  # new handshakes: the renewed certificate
    assert vm.main_pid() == pid  # and no restart for it


def test_12_no_failed_units(vm):
    assert vm.run("systemctl", "--failed", "--no-legend").stdout.strip() == ""


def test_13_uninstall_keeps_config_and_purge_removes_it(vm):
    vm.run("bash", f"{DEPLOY}/uninstall.sh", timeout=120)
    assert not vm.exists("/etc/systemd/system/ollama-lb.service")
    assert not vm.exists("/etc/systemd/system/ollama-lb.socket")
    assert not vm.exists("/etc/systemd/system/ollama-lb.socket.d")
    assert not vm.exists("/opt/ollama-lb")
    assert vm.exists(CONFIG)
    vm.run("bash", f"{DEPLOY}/uninstall.sh", "--purge", timeout=120)
    assert not vm.exists(CONFIG)
    assert vm.run("id", "ollama-lb", check=False).returncode != 0
    assert vm.run("systemctl", "--failed", "--no-legend").stdout.strip() == ""
