"""Watching a waiting client's socket: a client that goes away cancels its work at once.

While a view waits for its reply (queued for capacity, a cold load, the first byte, a whole
non-streamed reply) nothing is written to the client, so a client that gives up would only be
noticed when the reply is finally written, after the GPU did the work for nobody. Ollama itself
cancels generation when its client leaves; so does the appliance: a read watcher on the client
socket fires when the peer closes (EOF) or resets, and abandons the ticket. No polling: the
event loop tells us.
"""

from __future__ import annotations

import socket
from typing import Any

import gevent

from pipeline.request import Ticket

_READ = 1  # libev/libuv EV_READ
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


def _peer_gone(raw: Any) -> bool | None:
    """True: EOF or reset; False: data waiting (a pipelined request); None: nothing yet."""
    try:
        data = raw.recv(1, _PEEK)
    except BlockingIOError:
        return None
    except OSError:
        return True
    return not data


class ClientWatch:
    """While inside, the ticket is abandoned as soon as the client's socket reports EOF.

    A class rather than a ``contextmanager`` generator: it runs around every proxied request,
    and a generator-based context manager costs four more Python calls each time.
    """

    __slots__ = ("raw", "ticket", "watcher")

    def __init__(self, sock: Any, ticket: Ticket) -> None:
        self.raw = getattr(sock, "_sock", sock)  # gevent's socket wraps the real one
        self.ticket = ticket
        self.watcher: Any = None

    def __enter__(self) -> ClientWatch:
        try:
            fd = self.raw.fileno()
        except (OSError, AttributeError):
            return self
        if fd >= 0:
            self.watcher = gevent.get_hub().loop.io(fd, _READ)
            self.watcher.start(self._readable)
        return self

    def _readable(self) -> None:
        gone = _peer_gone(self.raw)
        if gone is None:
            return
        self.watcher.stop()  # one verdict is enough; pipelined bytes are left for pywsgi
        if gone:
            self.ticket.abandon("the client closed the connection")

    def __exit__(self, *exc: object) -> None:
        watcher, self.watcher = self.watcher, None
        if watcher is not None:
            watcher.stop()
            watcher.close()


watching = ClientWatch  # what the views call
