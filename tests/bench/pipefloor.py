"""What relaying a stream line costs gevent itself: a byte pipe, no HTTP, as the floor.

``profile_stream.py`` measures the appliance's CPU per relayed line; this measures, under the
same node and client, a proxy that does the least any gevent proxy must: one greenlet per
direction, ``recv`` then ``sendall``, nothing parsed. The difference between the two is
what the appliance's own code costs per line; this figure is what gevent, the hub and the
two system calls cost on this machine. With ``--callbacks`` the node-to-client direction runs
from a libev watcher's callback in the hub instead (nginx's shape: no greenlet switch per
line), which is the floor of a relay that would give up a greenlet per stream. Usage:

  .venv/bin/python tests/bench/pipefloor.py [--streams 50] [--tokens 400] [--rate 200]
      [--rounds 3] [--path /v1/chat/completions] [--callbacks]
"""
# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import contextlib
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlsplit

import gevent
from gevent.event import Event
from gevent.server import StreamServer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs
from profile_stream import one_round


def pipe(src: socket.socket, dst: socket.socket) -> None:
    """Copy until ``src`` ends, then end ``dst``'s writing side."""
    wait, event, recv = src._wait, src._read_event, src._sock.recv  # type: ignore[attr-defined]
    send = dst._sock.send  # type: ignore[attr-defined]
    try:
        while True:
            wait(event)  # wait for readability first: no failed recv per line
            if not (data := recv(65536)):
                break
            if (sent := send(data)) < len(data):  # the kernel took part: gevent's sendall
                dst.sendall(data[sent:])  # waits for room
    except OSError:
        pass
    finally:
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)


def pipe_in_hub(src: socket.socket, dst: socket.socket, done: Event) -> None:
    """Copy from a watcher's callback until ``src`` ends or fails, then end ``dst`` and set
    ``done``. A send the kernel takes only part of stops the watcher while a greenlet sends
    the rest."""
    watcher = gevent.get_hub().loop.io(src.fileno(), 1)
    recv, send = src._sock.recv, dst._sock.send  # type: ignore[attr-defined]

    def end() -> None:
        watcher.stop()
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        done.set()

    def rest(data: bytes) -> None:
        try:
            dst.sendall(data)
        except OSError:
            end()
        else:
            watcher.start(on_read)

    def on_read() -> None:
        try:
            data = recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        try:
            sent = send(data) if data else 0
        except BlockingIOError:  # no room at all: the rest is all of it (never dropped)
            sent = 0
        except OSError:
            data = b""
        if not data:
            end()
        elif sent < len(data):
            watcher.stop()
            gevent.spawn(rest, data[sent:])

    watcher.start(on_read)


def serve(node: tuple[str, int], in_hub: bool):  # type: ignore[no-untyped-def]
    def handle(client: socket.socket, _addr: object) -> None:
        with socket.create_connection(node) as up:
            up.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if in_hub:
                done = Event()
                pipe_in_hub(up, client, done)
                pipe(client, up)
                done.wait()
                return
            back = gevent.spawn(pipe, up, client)
            pipe(client, up)
            back.join()
    return handle


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rate", type=float, default=200.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--callbacks", action="store_true",
                    help="node to client from a watcher callback in the hub")
    args = ap.parse_args()
    node = procs.fake_node("m", "fast", num_parallel=4096, tokens_per_second=args.rate,
                           tokens=args.tokens, max_queue=4096)
    parts = urlsplit(node.url)
    server = StreamServer(("127.0.0.1", 0), serve((parts.hostname or "", parts.port or 0),
                                                        args.callbacks))
    server.start()
    url = f"http://127.0.0.1:{server.server_port}"
    try:
        one_round(url, 5, args.path, False)  # warm-up
        t0, n = os.times(), 0
        for _ in range(args.rounds):
            n += one_round(url, args.streams, args.path, False)["lines"]
        t1 = os.times()
    finally:
        server.stop()
        node.stop()
    user, system = t1.user - t0.user, t1.system - t0.system
    shape = "from a watcher callback" if args.callbacks else "one greenlet per direction"
    print(f"byte pipe ({shape}), {args.streams} streams x {args.tokens} tokens at {args.rate:g}/s:")
    print(f"  CPU per line  {(user + system) / n * 1e6:.1f} us "
          f"({user / n * 1e6:.1f} user, {system / n * 1e6:.1f} system)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
