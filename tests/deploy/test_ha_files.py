"""`install.sh --ha` without a VM: deploy/ha.sh renders keepalived.conf, keepalived accepts it.

The rendered files are checked by the real ``keepalived -t`` (config test) inside a network
namespace this test creates, holding the veth pair the config names (nothing is sent: -t only
parses). The booted-systemd run (test_vm_scaleout.py) installs and starts the same files.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
KEEPALIVED = shutil.which("keepalived") or (
    "/usr/sbin/keepalived" if os.path.exists("/usr/sbin/keepalived") else None)
NETNS = f"lbha-files{os.getpid() % 100000}"


def ha_sh(tmp_path: Path, snippet: str, server: dict | None = None,
          ) -> subprocess.CompletedProcess[str]:
    """``snippet`` after sourcing lib.sh and ha.sh, with a "release" that is this repo's
    Python, a config with ``server``, and keepalived's directory moved to tmp_path/etc."""
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True, exist_ok=True)
    python = release / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "server": server or {"host": "0.0.0.0", "port": 8080},
        "nodes": [{"id": "a", "url": "http://127.0.0.1:1"}]}))
    etc = tmp_path / "etc"
    etc.mkdir(exist_ok=True)
    return subprocess.run(
        ["bash", "-c", f'set -euo pipefail; . "{DEPLOY}/lib.sh"; . "{DEPLOY}/ha.sh"; '
         f'CONFIG="{config}"; RELEASE="{release}"; KEEPALIVED_CONF="{etc}/keepalived.conf"; '
         f'HA_SUM="{etc}/ollama-lb.sha256"; HA_NEW="{etc}/keepalived.conf.ollama-lb-new"; '
         f'HA_CHECK="{DEPLOY}/keepalived/check_ollama_lb.sh"; {snippet}'],
        capture_output=True, text=True, timeout=60)


def render(tmp_path: Path, options: str, server: dict | None = None) -> str:
    out = ha_sh(tmp_path, f'{options}; ha_render "$RELEASE" "{tmp_path}/k.conf"', server)
    assert out.returncode == 0, out.stderr
    return (tmp_path / "k.conf").read_text()


@pytest.fixture
def veth():
    """A namespace with the veth pair v0/v1 (made inside it), for keepalived -t."""
    if KEEPALIVED is None:
        pytest.skip("keepalived is not installed (Debian package keepalived; .ci/run installs it)")
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (ip netns) for keepalived -t's interface")
    subprocess.run(["ip", "netns", "add", NETNS], check=True, capture_output=True)
    try:
        subprocess.run(["ip", "-n", NETNS, "link", "add", "v0", "type", "veth", "peer", "name",
                        "v1"], check=True, capture_output=True)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", NETNS], capture_output=True)


def config_test(tmp_path: Path, text: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "test.conf"
    path.write_text(text)
    return subprocess.run(["ip", "netns", "exec", NETNS, KEEPALIVED or "keepalived", "-t", "-f",
                           str(path)], capture_output=True, text=True, timeout=30)


def instances(text: str) -> list[str]:
    return text.split("vrrp_instance ")[1:]


def test_active_passive_with_a_unicast_peer_is_accepted_by_keepalived(tmp_path, veth):
    text = render(tmp_path, "HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_IF=v0; "
                            "HA_SRC=198.18.0.1; HA_PEERS=(198.18.0.2)")
    [one] = instances(text)
    assert "priority 150" in one and "virtual_router_id 51" in one and "nopreempt" in one
    assert "unicast_src_ip 198.18.0.1" in one and "198.18.0.2\n" in one
    assert "198.18.0.100/24 dev v0" in one
    assert f'script "{DEPLOY}/keepalived/check_ollama_lb.sh 8080 http"' in text
    assert "${" not in text and max(map(len, text.splitlines())) <= 100
    out = config_test(tmp_path, text)
    assert out.returncode == 0, out.stderr


def test_active_active_renders_two_instances_with_reversed_priorities(tmp_path, veth):
    text = render(tmp_path, "HA_VIPS=(198.18.0.100/24 198.18.0.101/24); HA_ROLE=secondary; "
                            "HA_IF=v0; HA_VRID=60")
    first, second = instances(text)
    assert first.startswith("OLLAMA_LB_1") and second.startswith("OLLAMA_LB_2")
    assert "virtual_router_id 60" in first and "virtual_router_id 61" in second
    assert "priority 100" in first and "priority 150" in second  # the primary's reversed
    assert "198.18.0.100/24" in first and "198.18.0.101/24" in second
    assert "unicast" not in first + second  # no --ha-peer: multicast
    assert "nopreempt" not in text and "preempt_delay 30" in first  # each VM gets its own back
    out = config_test(tmp_path, text)
    assert out.returncode == 0, out.stderr


def test_several_peers_and_https_reach_the_config(tmp_path, veth):
    text = render(tmp_path, "HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_IF=v0; "
                            "HA_SRC=198.18.0.1; HA_PEERS=(198.18.0.2 198.18.0.3)",
                  server={"host": "0.0.0.0", "port": 8443,
                          "tls": {"certFile": "/c.pem", "keyFile": "/k.pem"}})
    assert "unicast_peer {\n        198.18.0.2\n        198.18.0.3\n    }" in text
    assert "check_ollama_lb.sh 8443 https" in text
    assert config_test(tmp_path, text).returncode == 0


def test_keepalived_t_refuses_what_it_cannot_run(tmp_path, veth):
    """install.sh relies on keepalived -t: a missing check script would silently drop the
    track_script (the VIP would stay on a dead appliance); a wrong interface fails too."""
    text = render(tmp_path, "HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_IF=v0")
    assert config_test(tmp_path, text.replace("check_ollama_lb.sh", "missing.sh")).returncode
    assert config_test(tmp_path, text.replace("interface v0", "interface v9")).returncode


@pytest.mark.parametrize(("options", "message"), [
    ("HA_ROLE=primary", "--ha needs --ha-vip"),
    ("HA_VIPS=(198.18.0.100); HA_ROLE=primary", "give the prefix length"),
    ("HA_VIPS=(198.18.0.100/24 198.18.0.101/24 198.18.0.102/24); HA_ROLE=primary",
     "at most twice"),
    ("HA_VIPS=(198.18.0.100/24)", "--ha-role primary or --ha-role secondary"),
    ("HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_VRID=255", "1-254"),
    ("HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_IF=nosuch9", "no such interface"),
])
def test_bad_ha_options_are_refused_first(tmp_path, options, message):
    out = ha_sh(tmp_path, f"{options}; check_ha_options")
    assert out.returncode != 0 and message in out.stderr


def test_mixed_address_families_are_refused(tmp_path):
    out = ha_sh(tmp_path, 'HA_VIPS=(198.18.0.100/24); HA_ROLE=primary; HA_IF=v0; '
                          f'HA_SRC=2001:db8::1; HA_PEERS=(2001:db8::2); '
                          f'ha_render "$RELEASE" "{tmp_path}/k.conf"')
    assert out.returncode != 0 and "all IPv4 or all IPv6" in out.stderr


def test_keepalived_conf_follows_the_config_rules_of_install_sh(tmp_path):
    """Written if absent; rewritten while unedited; an edited or foreign file is kept and
    what install.sh would write goes beside it."""
    etc = tmp_path / "etc"
    conf, new = etc / "keepalived.conf", etc / "keepalived.conf.ollama-lb-new"
    (tmp_path / "a").write_text("A\n")
    (tmp_path / "b").write_text("B\n")

    def place(what: str) -> int:
        out = ha_sh(tmp_path, f'place_keepalived_conf "{tmp_path}/{what}" || exit $?')
        return out.returncode

    assert place("a") == 0 and conf.read_text() == "A\n"  # absent: written, summed
    assert place("a") == 1  # the same: nothing to do
    assert place("b") == 0 and conf.read_text() == "B\n"  # unedited: follows the options
    conf.write_text("B\n# the operator's line\n")
    assert place("a") == 2 and new.read_text() == "A\n"  # edited: kept, ours beside it
    assert conf.read_text().endswith("the operator's line\n")
    conf.write_text("A\n")
    assert place("a") == 1 and not new.exists()  # merged by hand: nothing left over
    assert place("b") == 0  # and unedited again: it follows the options once more
    (etc / "ollama-lb.sha256").unlink()
    conf.write_text("someone else's keepalived\n")
    assert place("a") == 2 and not (etc / "ollama-lb.sha256").exists()  # never adopted
