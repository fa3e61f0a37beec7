"""The simulated node's own socket helpers: a listener fit for benchmarks, and a hard reset.

Kept apart from the appliance's helpers so the two share no code. Nagle stays off on the
listener (accepted sockets inherit it on Linux): pywsgi writes headers and body separately,
and with Nagle a kept-alive peer would wait for its delayed ACK on every small reply.
"""

from __future__ import annotations

import select
import socket
import struct

from gevent import socket as gsocket

_LINGER_NOW = struct.pack("ii", 1, 0)  # l_onoff=1, l_linger=0: close() sends RST


def listen(host: str, port: int, backlog: int = 1024) -> gsocket.socket:
    """A bound, listening cooperative socket; port 0 takes a free one."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


def reset(sock: socket.socket | None) -> None:
    """Drop a connection the way a crashed peer does: RST, not FIN.

    pywsgi keeps a makefile() reference, which makes ``close()`` wait; ``_real_close``
    closes the descriptor at once.
    """
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_NOW)
        closer = getattr(sock, "_real_close", None) or sock.close
        closer()
    except OSError:
        pass


def peer_closed(sock: socket.socket | None) -> bool:
    """Whether the client has closed its end, without blocking or consuming anything.

    A readable socket whose peek reads nothing is at EOF; a reset one raises. Used while a
    non-streamed reply is being generated, when no write would notice the client leaving.
    """
    if sock is None:
        return False
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):  # reset, or already closed under us
        return True
