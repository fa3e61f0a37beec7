"""Listening sockets for gevent servers: TCP_NODELAY, SO_REUSEADDR and a chosen backlog.

gevent's pywsgi writes headers and body separately; with Nagle on, every small reply on a
kept-alive connection waits ~40 ms for the peer's delayed ACK (design notes §4: ~22 req/s per
connection). Sockets accepted from a listener with TCP_NODELAY inherit it on Linux.
"""

from __future__ import annotations

import socket

from gevent import socket as gsocket


def make_listener(host: str, port: int, backlog: int = 1024) -> gsocket.socket:
    """A bound, listening gevent socket (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def abort(sock: socket.socket | None) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): what a crashed peer looks like."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        # close() waits for makefile() references (pywsgi holds one); the real close does not
        getattr(sock, "_real_close", sock.close)()
    except OSError:
        pass
