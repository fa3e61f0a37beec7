"""Static checks of what deploy/ ships: shellcheck, systemd-analyze, config examples.

These run in `make test` where the tools exist (CI installs them); each skip says why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SCRIPTS = sorted(DEPLOY.glob("*.sh"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed "
                    "(apt-get install shellcheck)")
def test_shellcheck_finds_nothing_in_any_script():
    out = subprocess.run(["shellcheck", "-x", *map(str, SCRIPTS)], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout
    assert {s.name for s in SCRIPTS} >= {"install.sh", "upgrade.sh", "rollback.sh",
                                         "uninstall.sh"}


def test_scripts_are_strict_and_executable():
    for script in SCRIPTS:
        text = script.read_text()
        if script.name == "lib.sh" or not text.startswith("#!"):
            continue  # sourced by the scripts, not run

        assert "set -euo pipefail" in text, script.name
        assert script.stat().st_mode & 0o111, f"{script.name} is not executable"


@pytest.fixture
def unit_with_stub(tmp_path):
    """The unit with ExecStart pointed at a stub, so verify checks everything else here.

    The socket unit lies beside it, as in /etc/systemd/system, for Requires=ollama-lb.socket.
    """
    stub = tmp_path / "ollama-lb"
    stub.write_text("#!/bin/sh\n")
    stub.chmod(0o755)
    unit = tmp_path / "ollama-lb.service"
    unit.write_text((DEPLOY / "ollama-lb.service").read_text().replace(
        "/opt/ollama-lb/current/bin/ollama-lb", str(stub)))
    shutil.copy(DEPLOY / "ollama-lb.socket", tmp_path / "ollama-lb.socket")
    return unit


def verify(*units: Path) -> None:
    out = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, units)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "" and out.stdout == "", out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_systemd_analyze_verify_is_silent(unit_with_stub):
    verify(unit_with_stub, unit_with_stub.with_suffix(".socket"))


def listen_dropin(tmp_path: Path, server: dict) -> subprocess.CompletedProcess[str]:
    """lib.sh's listen_dropin for a config with ``server``, run by this repo's Python."""
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True, exist_ok=True)
    python = release / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"server": server,
                                      "nodes": [{"id": "a", "url": "http://127.0.0.1:1"}]}))
    return subprocess.run(["bash", "-c", f'. "{DEPLOY}/lib.sh"; CONFIG="{config}"; '
                           f'listen_dropin "{release}"'], capture_output=True, text=True,
                          timeout=60, cwd=DEPLOY.parent)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
@pytest.mark.parametrize(("host", "address"), [("0.0.0.0", "0.0.0.0:11434"),
                                               ("127.0.0.1", "127.0.0.1:11434"),
                                               ("::", "[::]:11434"),
                                               ("localhost", "127.0.0.1:11434")])
def test_socket_dropin_listens_where_the_config_says(tmp_path, unit_with_stub, host, address):
    out = listen_dropin(tmp_path, {"host": host, "port": 11434, "backlog": 2048})
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[lines.index("[Socket]") + 1:] == [
        "ListenStream=", f"ListenStream={address}", "Backlog=2048"]
    dropins = unit_with_stub.parent / "ollama-lb.socket.d"
    dropins.mkdir()
    (dropins / "listen.conf").write_text(out.stdout + "\n")
    verify(unit_with_stub.with_suffix(".socket"))  # the drop-in is read, and silent too


def test_socket_dropin_refuses_port_0(tmp_path):
    out = listen_dropin(tmp_path, {"host": "0.0.0.0", "port": 0})
    assert out.returncode != 0 and "fixed port" in out.stderr


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze")
def test_security_exposure_is_at_most_2(unit_with_stub):
    out = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20",
                          str(unit_with_stub)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:]
    level = float(out.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0])
    assert level <= 2.0


def assert_every_directive_is_commented(unit: str) -> None:
    commented = False  # every directive is explained by a comment in its paragraph
    for line in unit.splitlines():
        if not line.strip() or line.startswith("["):
            commented = False
        elif line.startswith("#"):
            commented = True
        else:
            assert commented, f"no comment explains: {line}"


def test_socket_unit_holds_the_listener_with_the_options_the_app_sets():
    from app.server import EXIT_STREAMS_CUT

    socket_unit = (DEPLOY / "ollama-lb.socket").read_text()
    for directive in ("ListenStream=", "NoDelay=yes", "KeepAlive=yes", "Backlog=1024",
                      "Accept=no", "WantedBy=sockets.target"):
        assert directive in socket_unit
    assert_every_directive_is_commented(socket_unit)
    service = (DEPLOY / "ollama-lb.service").read_text()
    assert "Requires=ollama-lb.socket" in service and "After=ollama-lb.socket" in service
    assert f"SuccessExitStatus={EXIT_STREAMS_CUT}" in service  # a cut drain is no failure


def test_unit_is_notify_with_reload_restart_and_file_limit():
    unit = (DEPLOY / "ollama-lb.service").read_text()
    for directive in ("Type=notify", "ExecReload=/bin/kill -HUP $MAINPID",
                      "Restart=on-failure", "LimitNOFILE=65536", "WatchdogSec=",
                      "ProtectSystem=strict", "NoNewPrivileges=yes",
                      "MemoryDenyWriteExecute=yes", "CapabilityBoundingSet=\n"):
        assert directive in unit
    stop = int(unit.split("TimeoutStopSec=")[1].split()[0])
    example = load_config(DEPLOY / "config.example.yaml")
    from app.server import CUT_GRACE_S

    # the drain, then the cut streams' error lines, fit before SIGKILL
    assert stop > example.server.drainSeconds + 2 * CUT_GRACE_S
    assert_every_directive_is_commented(unit)


def test_example_config_and_cloud_init_are_valid():
    cfg = load_config(DEPLOY / "config.example.yaml")
    assert cfg.nodes and cfg.server.port == 8080
    cloud = yaml.safe_load((DEPLOY / "cloud-init.yaml").read_text())
    assert (DEPLOY / "cloud-init.yaml").read_text().startswith("#cloud-config")
    embedded = next(f for f in cloud["write_files"] if f["path"] == "/etc/ollama-lb/config.yaml")
    from pipeline.config import parse_text

    assert len(parse_text(embedded["content"]).nodes) == 2
    assert any("install.sh" in " ".join(map(str, cmd)) for cmd in cloud["runcmd"])


def test_sysctl_file_is_key_equals_value():
    for line in (DEPLOY / "sysctl-ollama-lb.conf").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = (part.strip() for part in line.split("=", 1))
            assert key.count(".") >= 1 and " " not in key and value


def lib_sh(tmp_path: Path, snippet: str) -> subprocess.CompletedProcess[str]:
    """``snippet`` run after sourcing lib.sh, with a "release" that is this repo's Python."""
    release = tmp_path / "release"
    (release / "bin").mkdir(parents=True, exist_ok=True)
    python = release / "bin" / "python"
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    return subprocess.run(["bash", "-c", f'set -euo pipefail; . "{DEPLOY}/lib.sh"; '
                           f'RELEASE="{release}"; {snippet}'], capture_output=True, text=True,
                          timeout=60, cwd=DEPLOY.parent)


@pytest.mark.parametrize("mutual", [False, True])
def test_a_config_written_from_the_example_gets_https_turned_on(tmp_path, mutual):
    config = tmp_path / "config.yaml"
    shutil.copy(DEPLOY / "config.example.yaml", config)
    assert load_config(config).server.tls.certFile is None  # off in the example as shipped
    out = lib_sh(tmp_path, f'enable_tls_in_config "{config}" {int(mutual)}; '
                           f'CONFIG="{config}"; config_tls_cert "$RELEASE"')
    assert out.returncode == 0, out.stderr
    tls = load_config(config).server.tls
    assert (tls.certFile, tls.keyFile) == ("/etc/ollama-lb/tls/cert.pem",
                                           "/etc/ollama-lb/tls/key.pem")
    assert tls.clientCaFile == ("/etc/ollama-lb/tls/client-ca.pem" if mutual else None)
    assert out.stdout.strip() == "/etc/ollama-lb/tls/cert.pem"
    rest = [line for line in config.read_text().splitlines() if "tls" not in line.lower()
            and "File:" not in line]
    example = [line for line in (DEPLOY / "config.example.yaml").read_text().splitlines()
               if "tls" not in line.lower() and "File:" not in line]
    assert rest == example  # nothing else was touched


@pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl not installed")
def test_tls_files_are_checked_before_they_are_installed(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import certs

    ca = certs.make_ca(tmp_path / "pki")
    cert, key = ca.issue("server")
    _, other_key = ca.issue("other")
    good = lib_sh(tmp_path, f'check_tls_files "$RELEASE" "{cert}" "{key}" "{ca.cert}"')
    assert good.returncode == 0, good.stderr
    bad = lib_sh(tmp_path, f'check_tls_files "$RELEASE" "{cert}" "{other_key}"')
    assert bad.returncode != 0 and "must match the certificate" in bad.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="install.sh refuses to run without root")
@pytest.mark.parametrize(("args", "message"), [
    (["--tls-cert", "/x.pem"], "--tls-cert and --tls-key go together"),
    (["--tls-client-ca", "/ca.pem"], "--tls-client-ca needs --tls-cert and --tls-key"),
    (["--tls-only"], "--tls-only needs --tls-cert and --tls-key"),
])
def test_install_refuses_incomplete_tls_options_before_changing_anything(args, message):
    out = subprocess.run(["bash", str(DEPLOY / "install.sh"), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode != 0 and message in out.stderr
