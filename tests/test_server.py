"""The appliance as a process: CLI, config errors at start, graceful drain, signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import gevent
import ollama
import pytest
import requests
import yaml

PY = sys.executable


def write_config(path, nodes, **extra):
    cfg = {"server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 10},
           "nodes": [{"id": f"n{i}", "url": n.url} for i, n in enumerate(nodes)],
           "healthCheck": {"intervalMs": 200, "modelRefreshMs": 200}, **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


class Proc:
    """``python -m app CONFIG`` with its JSON log read from stderr."""

    def __init__(self, config, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.p = subprocess.Popen([PY, "-m", "app", str(config), *args], stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, env=env)
        self.events: list[dict] = []
        self.url = ""
        with gevent.Timeout(15):
            self.wait_for("started")
        started = self.find("started")
        self.url = f"http://127.0.0.1:{started['port']}"

    def _read(self) -> None:
        line = self.p.stderr.readline()
        if not line:
            raise AssertionError(f"appliance exited: {self.p.wait()}")
        try:
            self.events.append(json.loads(line))
        except ValueError:
            self.events.append({"raw": line.decode()})

    def find(self, event):
        return next((e for e in self.events if e.get("event") == event), None)

    def wait_for(self, event, timeout=10.0):
        with gevent.Timeout(timeout):
            while self.find(event) is None:
                self._read()
        return self.find(event)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=15)
        finally:
            self.p.stderr.close()


@pytest.fixture
def proc():
    started = []

    def make(config, *args):
        p = Proc(config, *args)
        started.append(p)
        return p

    yield make
    for p in started:
        if p.p.poll() is None:
            p.p.kill()
            p.p.wait()


def run_cli(*args):
    return subprocess.run([PY, "-m", "app", *args], capture_output=True, text=True, timeout=30)


def test_check_config_accepts_the_shipped_config():
    out = run_cli("check-config", "config.yaml")
    assert out.returncode == 0 and "OK" in out.stdout


def test_invalid_config_lists_every_problem_by_key_path_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: {port: 99999}\nnodes:\n  - {id: a, url: 'ftp://x', colour: red}\n"
                   "disruptor: {ringBufferSize: 1000}\nbogus: 1\n")
    for args in (("check-config", str(bad)), (str(bad),)):
        out = run_cli(*args)
        assert out.returncode == 2
        for key in ("server.port", "nodes.0.url", "nodes.0.colour: Unknown field",
                    "disruptor.ringBufferSize: must be a power of two", "bogus: Unknown field"):
            assert key in out.stderr


def test_sigterm_lets_a_running_stream_finish_then_exits_zero(fake_node, tmp_path, proc):
    node = fake_node(["m"], decode_tps=20, tokens=20)  # a 1 s stream
    p = proc(write_config(tmp_path / "c.yaml", [node]))
    stream = ollama.Client(host=p.url).generate(model="m", prompt="x", stream=True)
    first = next(iter(stream))
    p.p.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert not first.done and rest[-1].done and len(rest) == 20
    assert p.wait_for("stopped")["cut_requests"] == 0  # logged after the drain, before exit
    assert p.stop() == 0


def test_new_requests_during_drain_are_refused_while_old_ones_finish(fake_node, tmp_path,
                                                                      proc):
    node = fake_node(["m"], decode_tps=20, tokens=20)
    p = proc(write_config(tmp_path / "c.yaml", [node]))
    session = requests.Session()
    assert session.get(f"{p.url}/api/version", timeout=5).ok  # a kept-alive connection
    r = session.post(f"{p.url}/api/generate", json={"model": "m", "prompt": "x"}, stream=True,
                     timeout=10)
    lines = r.iter_lines()
    next(lines)
    p.p.send_signal(signal.SIGTERM)
    p.wait_for("stopping")
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{p.url}/api/version", timeout=2)  # the listener is closed
    assert json.loads(list(lines)[-1])["done"] is True
    assert p.stop() == 0


def test_module_and_console_script_entry_points_agree():
    out = subprocess.run([os.path.join(os.path.dirname(PY), "ollama-lb"), "--help"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    for command in ("serve", "check-config", "fake-node", "demo"):
        assert command in out.stdout


def test_fake_node_command_serves_the_ollama_api():
    port = _free_port()
    p = subprocess.Popen([PY, "-m", "app", "fake-node", "--port", str(port), "--models",
                          "tiny", "--profile", "fast"], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    try:
        assert b"fake Ollama node" in p.stdout.readline()
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert [m.model for m in client.list().models] == ["tiny:latest"]
        assert client.generate(model="tiny", prompt="x").done
    finally:
        p.terminate()
        p.wait(timeout=10)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_prints_urls_and_serves_until_interrupted():
    port = _free_port()
    p = subprocess.Popen([PY, "-m", "app", "demo", "--port", str(port), "--profile", "fast"],
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        out = ""
        deadline = time.monotonic() + 20
        while "Ctrl-C" not in out and time.monotonic() < deadline:
            out += p.stdout.readline()
        assert f"http://127.0.0.1:{port}" in out and "curl" in out
        client = ollama.Client(host=f"http://127.0.0.1:{port}")
        assert {m.model for m in client.list().models} >= {"llama3.2:latest", "mistral:latest"}
        assert client.chat(model="mistral", messages=[{"role": "user", "content": "hi"}]).done
        p.send_signal(signal.SIGINT)
        assert p.wait(timeout=15) == 0
    finally:
        if p.poll() is None:
            p.kill()


def test_sighup_reloads_the_config(fake_node, tmp_path, proc):
    a, b = fake_node(["m"]), fake_node(["m"])
    path = write_config(tmp_path / "c.yaml", [a])
    p = proc(path, "--no-watch")
    write_config(path, [a, b])
    p.p.send_signal(signal.SIGHUP)
    event = p.wait_for("config_reload")
    assert event["trigger"] == "SIGHUP" and event["changes"]["added"] == ["n1"]
    nodes = requests.get(f"{p.url}/admin/nodes", timeout=5).json()["nodes"]
    assert [n["id"] for n in nodes] == ["n0", "n1"]
    assert p.stop() == 0
