"""install.sh --workers and --ha on a booted systemd, then uninstall.sh: one scenario in order.

The container runs in a network namespace this test creates (not the host's), so keepalived
may really start there and put its floating address on an interface: a veth pair made inside
the namespace, addresses from 198.18.0.0/15 only; the unicast peer has no host behind it, so
this VM becomes the VRRP master alone. A simulated Ollama node runs in the same namespace on
127.0.0.1:11434, where the example config points; clients (the official ``ollama`` client)
run there too. Nothing outside the namespace is ever a target.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import vm as vmlib
import yaml

pytestmark = [pytest.mark.deploy, pytest.mark.timeout(600),
              pytest.mark.skipif(vmlib.why_not() is not None, reason=str(vmlib.why_not()))]

REPO = Path(__file__).resolve().parents[2]
SRC, DEPLOY = "/mnt/src", "/mnt/deploy"
WHEEL = f"{SRC}/wheels/ollama_load_balancer-0.1.0-py3-none-any.whl"
CONFIG = "/etc/ollama-lb/config.yaml"
NETNS = f"lbvm-ha{os.getpid() % 100000}"
ADDR, PEER, VIP = "198.18.1.1", "198.18.1.2", "198.18.1.100"
HA = ["--ha", "--ha-vip", f"{VIP}/24", "--ha-role", "primary", "--ha-interface", "va",
      "--ha-peer", PEER]


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


@pytest.fixture(scope="module")
def netns():
    """The VM's network: lo, and the veth pair va (198.18.1.1/24) / vb (no address)."""
    ip("netns", "add", NETNS)
    try:
        ip("-n", NETNS, "link", "set", "lo", "up")
        ip("-n", NETNS, "link", "add", "va", "type", "veth", "peer", "name", "vb")
        ip("-n", NETNS, "addr", "add", f"{ADDR}/24", "dev", "va")
        for dev in ("va", "vb"):
            ip("-n", NETNS, "link", "set", dev, "up")
        yield NETNS
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


@pytest.fixture(scope="module")
def node(netns, tmp_path_factory):
    """A simulated Ollama node where the example config's node is: 127.0.0.1:11434."""
    log = open(tmp_path_factory.mktemp("node") / "node.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-m", "app",
                             "fake-node", "--port", "11434", "--profile", "fast", "--models",
                             "llama3.2"], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    yield proc
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


@pytest.fixture(scope="module")
def vm(artifacts, netns, node, tmp_path_factory):
    machine = vmlib.VM(tmp_path_factory.mktemp("vm-ha") / "root",
                       {str(artifacts): SRC, str(REPO / "deploy"): DEPLOY}, netns=netns)
    yield machine
    machine.stop()


def install(vm, *extra: str) -> subprocess.CompletedProcess[str]:
    return vm.run("bash", f"{DEPLOY}/install.sh", "--wheel", WHEEL, "--wheelhouse",
                  f"{SRC}/wheelhouse", *extra, timeout=300)


def in_netns(code: str, timeout: float = 120) -> str:
    """Python ``code`` run inside the namespace (the VM's network) by this repo's venv."""
    out = subprocess.run(["ip", "netns", "exec", NETNS, sys.executable, "-c", code], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def holds_vip(vm) -> bool:
    return f" {VIP}/24 " in vm.run("ip", "-o", "addr", "show", "dev", "va").stdout


def wait_for(vm, predicate, timeout: float) -> float:
    """Seconds until ``predicate()`` held (polled every 0.1 s); fails after ``timeout`` with
    keepalived's journal."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            log = vm.run("journalctl", "-u", "keepalived", "--no-pager", "-n", "40").stdout
            raise AssertionError(f"not within {timeout} s; keepalived says:\n{log}")
        time.sleep(0.1)
    return time.monotonic() - start


def journal(vm, unit: str = "ollama-lb") -> list[dict]:
    out = vm.run("journalctl", "-u", unit, "-o", "cat", "--no-pager").stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def test_01_workers_install_runs_a_local_redis_and_serves_through_both_workers(vm):
    out = install(vm, "--workers", "2")
    assert "server.workers 2, sharedState.redisUrl unix:///run/ollama-lb-redis/redis.sock" \
        in out.stdout  # a config install.sh writes gets both keys
    config = yaml.safe_load(vm.read(CONFIG))
    assert config["server"]["workers"] == 2
    assert vm.run("systemctl", "is-active", "ollama-lb-redis").stdout.strip() == "active"
    assert vm.run("stat", "-c", "%U %a", "/run/ollama-lb-redis/redis.sock").stdout.split() \
        == ["ollama-lb", "700"]
    assert vm.run("systemctl", "is-active", "redis-server", check=False).stdout.strip() \
        != "active"  # the package's own instance on 127.0.0.1:6379 does not run
    served = json.loads(in_netns(
        "import concurrent.futures as f, json, ollama, requests, time\n"
        "c = ollama.Client(host='http://127.0.0.1:8080')\n"
        "with f.ThreadPoolExecutor(8) as pool:\n"
        "    done = list(pool.map(lambda i: c.generate(model='llama3.2', prompt=str(i)).done,"
        " range(40)))\n"
        "for _ in range(100):  # the workers start in the rejoin window, then count in Redis\n"
        "    h = requests.get('http://127.0.0.1:8080/health', timeout=5).json()\n"
        "    if h['sharedState']['mode'] == 'shared':\n"
        "        break\n"
        "    time.sleep(0.2)\n"
        "print(json.dumps({'done': done, 'health': h}))"))
    assert served["done"] == [True] * 40
    shared = served["health"]["sharedState"]
    assert shared["mode"] == "shared" and len(shared["instancesAlive"]) == 2, shared
    ready = [e for e in journal(vm) if e.get("event") == "workers_ready"]
    workers = {e.get("worker") for e in journal(vm) if e.get("event") == "request"}
    assert ready and len(ready[-1]["workers"]) == 2
    assert workers == set(ready[-1]["workers"])  # both workers served requests


def test_02_ha_install_renders_a_config_keepalived_accepts_and_takes_the_address(vm):
    out = install(vm, "--workers", "2", *HA)
    assert "wrote /etc/keepalived/keepalived.conf (VIP 198.18.1.100/24 on va, primary)" \
        in out.stdout, out.stdout + out.stderr
    conf = vm.read("/etc/keepalived/keepalived.conf")
    assert f"unicast_src_ip {ADDR}" in conf and "priority 150" in conf  # src: va's address
    assert 'script "/etc/keepalived/check_ollama_lb.sh 8080 http"' in conf
    vm.run("keepalived", "-t", "-f", "/etc/keepalived/keepalived.conf")  # config test passes
    vm.run("sha256sum", "--status", "-c", "/etc/keepalived/ollama-lb.sha256")
    assert vm.run("stat", "-c", "%U %a", "/etc/keepalived/check_ollama_lb.sh").stdout.split() \
        == ["root", "755"]
    vm.run("/etc/keepalived/check_ollama_lb.sh", "8080", "http")  # 0: the appliance is ready
    assert vm.run("systemctl", "is-enabled", "keepalived").stdout.strip() == "enabled"
    assert vm.run("systemctl", "is-active", "keepalived").stdout.strip() == "active"
    took = wait_for(vm, lambda: holds_vip(vm), timeout=20)  # no peer answers: master alone
    print(f"keepalived took the VIP {took:.1f} s after install.sh returned")
    reply = in_netns("import requests\nprint(requests.get("
                     f"'http://{VIP}:8080/health/ready', timeout=5).status_code)")
    assert reply.strip() == "200"  # the appliance answers on the floating address


def test_03_the_address_leaves_when_the_appliance_stops_and_comes_back(vm):
    vm.run("systemctl", "stop", "ollama-lb.socket", "ollama-lb")  # both: no socket activation
    assert vm.run("/etc/keepalived/check_ollama_lb.sh", "8080", check=False).returncode != 0
    left = wait_for(vm, lambda: not holds_vip(vm), timeout=20)
    vm.run("systemctl", "start", "ollama-lb.socket", "ollama-lb")
    back = wait_for(vm, lambda: holds_vip(vm), timeout=30)
    print(f"VIP released {left:.1f} s after systemctl stop returned (check 1 s, fall 2), "
          f"back {back:.1f} s after it started (rise 2, then VRRP master)")
    assert left < 8


def test_04_install_again_keeps_an_edited_keepalived_conf_and_keepalived(vm):
    pid = vm.main_pid("keepalived")
    edited = vm.read("/etc/keepalived/keepalived.conf") + "# the operator's note\n"
    vm.write("/etc/keepalived/keepalived.conf", edited)
    out = install(vm, "--workers", "2", *HA, "--ha-peer", "198.18.1.3")
    assert "keeping the edited /etc/keepalived/keepalived.conf" in out.stderr
    assert vm.read("/etc/keepalived/keepalived.conf") == edited
    assert "198.18.1.3" in vm.read("/etc/keepalived/keepalived.conf.ollama-lb-new")
    assert vm.main_pid("keepalived") == pid  # neither restarted nor reloaded
    assert vm.run("systemctl", "--failed", "--no-legend").stdout.strip() == ""


def test_05_uninstall_removes_what_workers_and_ha_installed(vm):
    vm.run("bash", f"{DEPLOY}/uninstall.sh", timeout=120)
    assert vm.run("systemctl", "is-enabled", "keepalived", check=False).stdout.strip() \
        == "disabled"
    assert vm.run("systemctl", "is-active", "keepalived", check=False).stdout.strip() \
        == "inactive"
    assert not holds_vip(vm)  # stopping keepalived gave the address up
    for gone in ("/etc/keepalived/check_ollama_lb.sh",
                 "/etc/keepalived/keepalived.conf.ollama-lb-new",
                 "/etc/systemd/system/ollama-lb-redis.service",
                 "/etc/systemd/system/ollama-lb.service.d", "/run/ollama-lb-redis"):
        assert not vm.exists(gone), gone
    assert vm.run("systemctl", "is-active", "ollama-lb-redis", check=False
                  ).stdout.strip() == "inactive"
    assert vm.exists("/etc/keepalived/keepalived.conf")  # config: kept without --purge
    vm.run("bash", f"{DEPLOY}/uninstall.sh", "--purge", timeout=120)
    assert not vm.exists("/etc/keepalived/keepalived.conf")
    assert not vm.exists("/etc/keepalived/ollama-lb.sha256")
    assert vm.run("systemctl", "--failed", "--no-legend").stdout.strip() == ""
