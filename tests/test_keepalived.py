"""keepalived in front of two appliances: the floating address moves when one appliance dies.

The test builds its own little network: two network namespaces joined by a veth pair that is
created inside them, addressed only from the benchmarking range 198.18.0.0/15. Each namespace
runs a simulated node, an appliance and keepalived rendered from the shipped
``deploy/keepalived/keepalived.conf.template`` with the shipped check script. Nothing outside
those namespaces (and their loopback) is ever a target. Needs root, ``ip netns`` and the
Debian package ``keepalived``; without them it skips and says why (in CI the skip fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import string
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.waiting import wait_until

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "keepalived"
KEEPALIVED = shutil.which("keepalived") or (
    "/usr/sbin/keepalived" if os.path.exists("/usr/sbin/keepalived") else None)
SUFFIX = f"{os.getpid() % 100000}"
NETNS = {"a": f"lbka-a{SUFFIX}", "b": f"lbka-b{SUFFIX}"}
ADDR = {"a": "198.18.0.1", "b": "198.18.0.2"}
VIP = "198.18.0.100"
ADVERT = 0.2  # VRRPv3 advert interval in the test (the template's notes say 1 s is usual)


def _netns_reason() -> str | None:
    if KEEPALIVED is None:
        return "keepalived is not installed (Debian package keepalived; .ci/run installs it)"
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (ip netns) to build its network namespaces"
    probe = f"lbka-probe{SUFFIX}"
    if subprocess.run(["ip", "netns", "add", probe], capture_output=True).returncode != 0:
        return "network namespaces are not available here (ip netns add failed)"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=10)


def nsexec(side: str, *argv: str, **kw) -> subprocess.Popen[bytes]:
    return subprocess.Popen(["ip", "netns", "exec", NETNS[side], *argv], **kw)


@pytest.fixture
def network() -> Iterator[None]:
    reason = _netns_reason()
    if reason:
        pytest.skip(reason)
    try:
        for side in "ab":
            ip("netns", "add", NETNS[side])
            ip("-n", NETNS[side], "link", "set", "lo", "up")
        ip("-n", NETNS["a"], "link", "add", "vka", "type", "veth", "peer", "name", "vkb",
           "netns", NETNS["b"])  # made inside namespace a, its peer moved into b
        for side in "ab":
            dev = f"vk{side}"
            ip("-n", NETNS[side], "addr", "add", f"{ADDR[side]}/24", "dev", dev)
            ip("-n", NETNS[side], "link", "set", dev, "up")
        yield
    finally:
        for side in "ab":
            subprocess.run(["ip", "netns", "del", NETNS[side]], capture_output=True)


def holds_vip(side: str) -> bool:
    out = subprocess.run(["ip", "-n", NETNS[side], "-o", "addr", "show"], capture_output=True,
                         text=True, timeout=5).stdout
    return f" {VIP}/" in out


def render(tmp: Path, side: str, priority: int) -> Path:
    text = string.Template((DEPLOY / "keepalived.conf.template").read_text()).substitute(
        ROUTER_ID=f"lb-{side}", CHECK=str(DEPLOY / "check_ollama_lb.sh"), PORT="8080",
        SCHEME="http", CHECK_INTERVAL="1", STATE="BACKUP", INTERFACE=f"vk{side}", VRID="51",
        PRIORITY=str(priority), ADVERT=str(ADVERT), SRC_IP=ADDR[side],
        PEER_IP=ADDR["b" if side == "a" else "a"], VIP=f"{VIP}/24")
    path = tmp / f"keepalived-{side}.conf"
    path.write_text(text)
    return path


class Side:
    """One VM: a simulated node, the appliance and keepalived, in one namespace."""

    def __init__(self, tmp: Path, side: str, priority: int) -> None:
        self.side, self.procs = side, {}
        self.log = open(tmp / f"{side}.log", "wb")  # noqa: SIM115 - closed in stop()
        cfg = {"server": {"host": "0.0.0.0", "port": 8080, "drainSeconds": 1},
               "nodes": [{"id": "n0", "url": "http://127.0.0.1:11434"}],
               "healthCheck": {"intervalMs": 300}, "logging": {"level": "WARNING"}}
        config = tmp / f"lb-{side}.yaml"
        config.write_text(yaml.safe_dump(cfg))
        out = {"stdout": self.log, "stderr": self.log}
        self.procs["node"] = nsexec(side, sys.executable, "-m", "app", "fake-node", "--port",
                                    "11434", "--profile", "fast", "--models", "tiny", **out)
        self.procs["app"] = nsexec(side, sys.executable, "-m", "app", str(config),
                                   "--no-watch", **out)
        self.tmp, self.priority, self.out = tmp, priority, out

    def start_keepalived(self) -> None:
        """Started once both appliances are ready: with ``nopreempt``, whoever becomes master
        first keeps the address, so a slow start must not decide the test."""
        run = self.tmp / f"run-{self.side}"
        run.mkdir()
        self.procs["keepalived"] = nsexec(
            self.side, KEEPALIVED or "keepalived", "--dont-fork", "--log-console", "--vrrp",
            "--use-file", str(render(self.tmp, self.side, self.priority)), "--pid",
            str(run / "k.pid"), "--vrrp_pid", str(run / "v.pid"), "--checkers_pid",
            str(run / "c.pid"), **self.out)

    def ready(self) -> bool:
        probe = subprocess.run(["ip", "netns", "exec", NETNS[self.side],
                                str(DEPLOY / "check_ollama_lb.sh"), "8080"],
                               capture_output=True, timeout=5)
        return probe.returncode == 0

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.log.close()


def test_the_floating_address_moves_when_the_masters_appliance_dies(network, tmp_path):
    sides = {"a": Side(tmp_path, "a", 150), "b": Side(tmp_path, "b", 100)}
    try:
        assert wait_until(lambda: all(s.ready() for s in sides.values()), timeout=40, step=0.2)
        # a first: with nopreempt whoever is master first keeps the VIP, and on a loaded
        # machine a's first check may come late enough for b to win a simultaneous start
        sides["a"].start_keepalived()
        assert wait_until(lambda: holds_vip("a"), timeout=15), (tmp_path / "a.log").read_text()
        sides["b"].start_keepalived()
        assert wait_until(lambda: b"Entering BACKUP STATE" in (tmp_path / "b.log").read_bytes(),
                          timeout=15)
        assert holds_vip("a") and not holds_vip("b")
        served = subprocess.run(["ip", "netns", "exec", NETNS["b"], "curl", "-fsS",
                                 "--max-time", "2", f"http://{VIP}:8080/health/ready"],
                                capture_output=True, timeout=5)
        assert served.returncode == 0, served.stderr  # b reaches the appliance on a via the VIP
        sides["a"].procs["app"].kill()  # a's keepalived still runs: only its check fails
        killed = time.monotonic()
        assert wait_until(lambda: holds_vip("b") and not holds_vip("a"), timeout=15, step=0.02)
        failover = time.monotonic() - killed
        served = subprocess.run(["ip", "netns", "exec", NETNS["a"], "curl", "-fsS",
                                 "--max-time", "2", f"http://{VIP}:8080/health/ready"],
                                capture_output=True, timeout=5)
        assert served.returncode == 0, served.stderr  # now the VIP is b's appliance
        print(f"keepalived failover after the appliance was killed: {failover:.2f} s "
              f"(check every 1 s, fall 2, VRRPv3 advert {ADVERT} s)")
        # fall 2 x interval 1 s + the check's own timeout + 3 adverts + skew, with margin
        assert failover < 5.0, failover
    finally:
        for s in sides.values():
            s.stop()
