"""A stream relayed from the hub's loop (``StreamRelay.pump``), through real sockets.

Between two pieces the handler's greenlet waits once while a watcher on the node's socket
writes each plain piece to the client; anything else (the end, an error, a slow client, a
piece to check) goes back to the greenlet. These tests pin what that must not change: every
line arrives whole and in order, however fast the node and however slow the client.
"""

from __future__ import annotations

import gc
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
import greenlet
import ollama
import requests

from app.transport import ApplianceServer
from tests.test_transport import http_request
from tests.waiting import wait_until


def _client_handler(g: Any) -> bool:
    """``g`` is the appliance's handler of a client connection (gevent spawns it with the
    server's bound ``handle`` as its first argument)."""
    args = getattr(g, "args", None) or (None,)
    return isinstance(getattr(args[0], "__self__", None), ApplianceServer)


@contextmanager
def handler_switches() -> Iterator[list[int]]:
    """Counts the switches into the appliance's client handlers meanwhile."""
    count = [0]

    def trace(event: str, args: Any) -> None:
        if event in ("switch", "throw") and _client_handler(args[1]):
            count[0] += 1

    old = greenlet.settrace(trace)
    try:
        yield count
    finally:
        greenlet.settrace(old)


def test_a_token_stream_is_relayed_without_a_greenlet_switch_per_line(fake_node, appliance):
    node = fake_node(["m"], decode_tps=400.0, tokens=120)  # a line every 2.5 ms
    lb = appliance([node])
    client = ollama.Client(host=lb.url)
    with handler_switches() as switches:
        parts = list(client.generate(model="m", prompt="x", stream=True))
    assert len(parts) == 121 and parts[-1].done and parts[-1].eval_count == 120
    direct = ollama.Client(host=node.url).generate(model="m", prompt="x")
    assert "".join(p.response for p in parts) == direct.response
    assert switches[0] < 30, f"{switches[0]} switches into the handler for 121 lines"


def test_a_body_that_arrives_whole_in_the_first_read_ends_at_once(fake_node, appliance):
    """The fast profile writes every token at once: the reader has seen the last chunk
    before the relay could wait for more, so waiting would only end at the idle timeout."""
    node = fake_node(["m"], tokens=8)
    lb = appliance([node], timeouts={"streamIdleTimeoutMs": 20_000})
    t0 = time.monotonic()
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"}, timeout=10)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert time.monotonic() - t0 < 5
    assert len(lines) == 9 and lines[-1]["done"] and "error" not in lines[-1]


def _read_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while not out.endswith(b"\r\n0\r\n\r\n"):
        chunk = sock.recv(65536)
        assert chunk, "EOF before the reply's last chunk"
        out += chunk
    return bytes(out)


def _waiting_for_room() -> bool:
    """A client handler is parked writing a reply (its client has no room for more)."""
    for g in gc.get_objects():
        if isinstance(g, gevent.Greenlet) and _client_handler(g) and not g.dead:
            frame = g.gr_frame
            while frame is not None:
                if frame.f_code.co_name == "_sendall":
                    return True
                frame = frame.f_back
    return False


def _unchunk(body: bytes) -> bytes:
    data, pos = bytearray(), 0
    while True:
        eol = body.index(b"\r\n", pos)
        size = int(body[pos:eol], 16)
        if size == 0:
            return bytes(data)
        data += body[eol + 2:eol + 2 + size]
        assert body[eol + 2 + size:eol + 4 + size] == b"\r\n"
        pos = eol + 4 + size


def test_a_client_with_no_room_gets_every_line_in_order_once_it_reads(fake_node, appliance):
    """A flood to a client that does not read: the kernel takes part of a piece, the greenlet
    waits for room with the rest, and the relay goes back to the hub; nothing is lost."""
    node = fake_node(["m"], tokens=40_000)  # every token at once: ~6 MB of lines
    lb = appliance([node])
    sock = socket.create_connection(("127.0.0.1", lb.port))
    try:
        sock.sendall(http_request("POST", "/api/generate", {"model": "m", "prompt": "x"}))
        assert wait_until(_waiting_for_room, 10, step=0.05), "the relay never waited for room"
        reply = _read_all(sock)
    finally:
        sock.close()
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"chunked" in head.lower()
    lines = [json.loads(line) for line in _unchunk(body).splitlines()]
    assert len(lines) == 40_001 and lines[-1]["done"] and lines[-1]["eval_count"] == 40_000
    direct = ollama.Client(host=node.url).generate(model="m", prompt="x")
    assert "".join(line["response"] for line in lines) == direct.response
