"""The client side of the server: write and keep-alive timeouts, socket options, the watchdog.

Raw sockets where a real client would hide what matters (a client that never reads, an idle
kept-alive connection); every wait is a bounded loop on an observable state.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import gevent
import pytest
import requests
import yaml

from app.netutil import listen_fds, make_listener
from app.server import CUT_REASON, EXIT_STREAMS_CUT, ClientHandler


def wait_until(predicate, timeout: float, step: float = 0.01) -> float:
    """Seconds until ``predicate()`` held; AssertionError after ``timeout``."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"not true within {timeout} s")
        gevent.sleep(step)
    return time.monotonic() - start


def http_request(method: str, path: str, body: dict | None = None) -> bytes:
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {path} HTTP/1.1\r\nHost: lb\r\nContent-Length: {len(data)}\r\n"
    if body is not None:
        head += "Content-Type: application/json\r\n"
    return head.encode() + b"\r\n" + data


def read_response(sock: socket.socket) -> tuple[bytes, bytes]:
    """One Content-Length response from a raw socket: (head, body)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        assert chunk, f"EOF before the response head: {buf!r}"
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "EOF in the response body"
        body += chunk
    return head, body


def test_client_that_stops_reading_is_cut_after_write_timeout_and_frees_the_node_slot(
        fake_node, appliance):
    node = fake_node(["m"], tokens=200_000)  # "fast": every token at once, a flood
    lb = appliance([node], server={"writeTimeoutMs": 300})
    n0 = lb.factory.node_registry.get("n0")
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and never reads
    try:
        client.connect(("127.0.0.1", lb.port))
        client.sendall(http_request("POST", "/api/generate", {"model": "m", "prompt": "x"}))
        wait_until(lambda: n0.in_flight == 1 and node.stats.streams_open == 1, 5)
        # the buffers fill, then nothing moves for writeTimeoutMs: the appliance gives up
        took = wait_until(lambda: n0.in_flight == 0, 0.3 + 5)
        wait_until(lambda: node.stats.disconnects == 1 and node.stats.streams_open == 0, 5)
        assert took >= 0.3
        assert lb.factory.pipeline.in_flight == 0
    finally:
        client.close()


def handler_on_socketpair(timeout: float) -> tuple[ClientHandler, socket.socket]:
    """A ClientHandler writing into a unix socketpair with small, fixed buffers."""
    ours, theirs = socket.socketpair()
    ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 32768)
    theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
    ours.settimeout(timeout)
    handler = ClientHandler(ours, "", None)
    handler.code = 200
    return handler, theirs


def test_write_timeout_bounds_each_wait_for_progress_not_a_whole_large_reply():
    """A big reply to a client that reads slowly but steadily is not cut; one that stops is."""
    handler, client = handler_on_socketpair(timeout=0.3)
    received = []

    def read_slowly(total: int) -> None:
        got = 0
        while got < total:
            chunk = client.recv(16384)  # ~1.6 MB/s: the 2 MB reply takes over a second
            if not chunk:
                return
            got += len(chunk)
            gevent.sleep(0.01)
        received.append(got)

    try:
        reader = gevent.spawn(read_slowly, 2_000_000)
        start = time.monotonic()
        handler._sendall(b"x" * 2_000_000)
        took = time.monotonic() - start
        reader.join(timeout=10)
        assert received == [2_000_000] and took > 0.3  # longer than the timeout in all
        assert handler.response_length == 2_000_000
        reader.kill()
        start = time.monotonic()
        with pytest.raises(TimeoutError):  # now nobody reads: cut after one timeout
            handler._sendall(b"x" * 2_000_000)
        assert 0.3 <= time.monotonic() - start < 3
    finally:
        handler.socket.close()
        client.close()


def test_idle_keepalive_connection_is_closed_after_keepalive_timeout(fake_node, appliance):
    lb = appliance([fake_node(["m"])], server={"keepAliveTimeoutMs": 400})
    client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    try:
        for _ in range(2):  # kept alive between requests
            client.sendall(http_request("GET", "/api/version"))
            head, body = read_response(client)
            assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["version"]
        start = time.monotonic()
        assert client.recv(1) == b""  # EOF from the appliance, not our timeout
        idle = time.monotonic() - start
        assert 0.3 <= idle < 5
    finally:
        client.close()


def test_a_request_sent_just_as_the_drain_begins_is_answered_not_dropped(fake_node, appliance):
    """A kept-alive client sends its next request right after a reply; a drain that begins
    between the two must answer it (with ``Connection: close``), not close the connection
    under it: the client cannot tell a request the server never read from one it lost."""
    lb = appliance([fake_node(["m"])], server={"drainSeconds": 10}, check_leaks=False)
    client = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    try:
        client.sendall(http_request("GET", "/api/version"))
        assert read_response(client)[0].startswith(b"HTTP/1.1 200")  # idle, kept alive
        stopping = gevent.spawn(lb.shutdown)
        wait_until(lambda: lb.server.draining, 5)
        client.sendall(http_request("GET", "/api/version"))
        head, body = read_response(client)
        assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["version"]
        assert b"connection: close" in head.lower()
        assert client.recv(1) == b""  # then closed by the appliance
        stopping.get(timeout=10)
    finally:
        client.close()
    assert not lb.server.connections and lb.factory.pipeline.in_flight == 0
    assert lb.exit_status == 0


def test_accepted_sockets_have_keepalive_and_nodelay(fake_node, appliance):
    lb = appliance([fake_node(["m"])])
    seen: list[tuple[int, int]] = []

    class Recording(ClientHandler):
        def read_requestline(self) -> str:
            seen.append((self.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                         self.socket.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)))
            return super().read_requestline()

    lb.server.handler_class = Recording
    assert requests.get(f"{lb.url}/api/version", timeout=5).ok
    assert seen and all(keepalive and nodelay for keepalive, nodelay in seen)
    listener = lb.server.socket
    assert listener.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
    assert listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


def test_listener_options_are_inherited_by_accepted_sockets():
    """Why the socket unit's KeepAlive=/NoDelay= reach every client connection."""
    listener = make_listener("127.0.0.1", 0)
    client = socket.create_connection(listener.getsockname(), timeout=5)
    try:
        accepted, _ = listener.accept()
        with accepted:
            assert accepted.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        client.close()
        listener.close()


def test_crashed_stage_stops_the_watchdog_pings_and_live_answers_503(
        fake_node, appliance, tmp_path, monkeypatch, greenlet_errors):
    """systemd restarts a process whose pings stop: they must stop when a stage is dead."""
    notify_sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify_sock.bind(str(tmp_path / "notify"))
    notify_sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    monkeypatch.setenv("WATCHDOG_USEC", "100000")  # a ping every 50 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        lb = appliance([fake_node(["m"])], check_leaks=False)  # a stage is dead on purpose
        pings, deadline = 0, time.monotonic() + 5
        while pings < 3 and time.monotonic() < deadline:  # fed while healthy
            pings += notify_sock.recv(4096).split(b"\n").count(b"WATCHDOG=1")
        assert pings >= 3
        assert requests.get(f"{lb.url}/health/live", timeout=5).status_code == 200

        stage = lb.factory.pipeline.stages[2]
        stage.greenlet.kill(RuntimeError("injected stage crash"))
        wait_until(lambda: lb.factory.pipeline.crashed is not None, 5)
        assert [e[2].args for e in greenlet_errors] == [("injected stage crash",)]
        greenlet_errors.clear()  # the crash was the point of this test

        status, deadline = b"", time.monotonic() + 5
        while b"STATUS=unhealthy" not in status:  # the pinger noticed and said why
            assert time.monotonic() < deadline, "the watchdog was still fed"
            status = notify_sock.recv(4096)
        assert b"watchdog pings withheld" in status and stage.name.encode() in status
        notify_sock.settimeout(0.5)  # ten ping intervals: none may come
        try:
            late = notify_sock.recv(4096)
        except TimeoutError:
            late = b""
        assert b"WATCHDOG=1" not in late
        live = requests.get(f"{lb.url}/health/live", timeout=5)
        assert live.status_code == 503 and live.json()["status"] == "DOWN"
        assert lb.factory.pipeline.in_flight == 0
    finally:
        notify_sock.close()


# --- systemd socket activation and the drain bound, as processes -------------------------------

class ActivatedProc:
    """``python -m app CONFIG`` given a listening socket as systemd gives it: fd 3, LISTEN_*."""

    def __init__(self, config, listener: socket.socket) -> None:
        fd = listener.fileno()
        script = (f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1; '
                  'exec "$0" -m app "$1"')
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "LISTEN_PID", "LISTEN_FDS", "WATCHDOG_USEC")}
        self.p = subprocess.Popen(["bash", "-c", script, sys.executable, str(config)],
                                  pass_fds=(fd,), stderr=subprocess.PIPE,
                                  stdout=subprocess.DEVNULL, env=env)
        self.events: list[dict] = []
        self.started = self.wait_for("started", 20)

    def wait_for(self, event: str, timeout: float = 10) -> dict:
        with gevent.Timeout(timeout):
            while not any(e.get("event") == event for e in self.events):
                line = self.p.stderr.readline()
                assert line, f"exited ({self.p.wait()}) before {event!r}: {self.events}"
                try:
                    self.events.append(json.loads(line))
                except ValueError:
                    self.events.append({"raw": line.decode(errors="replace")})
        return next(e for e in self.events if e.get("event") == event)

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=20)
        finally:
            if self.p.poll() is None:
                self.p.kill()
                self.p.wait()
            self.p.stderr.close()


def test_listen_fds_follows_the_sd_listen_fds_protocol(monkeypatch):
    monkeypatch.setenv("LISTEN_FDS", "1")
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))  # meant for another process
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ  # not passed on
    assert listen_fds() == []  # nothing set: bind as usual


def test_restart_with_a_socket_held_by_systemd_refuses_nothing_and_cut_streams_say_so(
        fake_node, tmp_path):
    """What a socket unit gives: the old process drains, the next one takes the same socket.

    The test holds the listening socket as systemd does. A stream that outlives
    ``drainSeconds`` ends with one error line in its own format (NDJSON, and an SSE error
    frame on /v1); a connection made while the old process drains waits in the socket's queue
    and is served by the next process.
    """
    node = fake_node(["m"], decode_tps=20, tokens=400)  # 20 s streams: longer than the drain
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(128)
    port = listener.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({
        "server": {"host": "127.0.0.1", "port": port, "drainSeconds": 1},
        "nodes": [{"id": "n0", "url": node.url}]}))
    procs = [ActivatedProc(config, listener)]
    try:
        assert procs[0].started["socket"] == "systemd" and procs[0].started["port"] == port
        ndjson = requests.post(f"{url}/api/generate", json={"model": "m", "prompt": "x"},
                               stream=True, timeout=30).iter_lines()
        sse = requests.post(f"{url}/v1/chat/completions", stream=True, timeout=30, json={
            "model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]},
        ).iter_lines()
        assert json.loads(next(ndjson))["done"] is False
        assert next(sse).startswith(b"data: {")
        procs[0].p.send_signal(signal.SIGTERM)
        procs[0].wait_for("stopping")
        queued = gevent.spawn(requests.get, f"{url}/api/version", timeout=30)

        rest = [json.loads(line) for line in ndjson if line]
        assert rest[-1] == {"error": CUT_REASON} and not any(r.get("done") for r in rest[:-1])
        frames = [line for line in sse if line]
        assert json.loads(frames[-1].removeprefix(b"data: "))["error"]["message"] == CUT_REASON
        assert procs[0].p.wait(timeout=15) == EXIT_STREAMS_CUT
        stopped = procs[0].wait_for("stopped")
        assert stopped["cut_streams"] == 2 and stopped["exit_status"] == EXIT_STREAMS_CUT

        procs.append(ActivatedProc(config, listener))  # what systemd starts next
        assert queued.get(timeout=30).json()["version"]  # waited in the queue, not refused
        reply = requests.post(f"{url}/api/generate", timeout=30,
                              json={"model": "m", "prompt": "x", "stream": False,
                                    "options": {"num_predict": 2}})
        assert reply.json()["done"] is True
        procs[1].p.send_signal(signal.SIGTERM)
        assert procs[1].wait_for("stopped")["cut_requests"] == 0
        assert procs[1].stop() == 0  # nothing in flight: nothing cut
    finally:
        for proc in procs:
            proc.stop()
        listener.close()
