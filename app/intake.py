"""Receiving a request within bounds: head size and count, head and body deadlines.

pywsgi reads a request line of up to 8 KiB, up to 100 header lines of 64 KiB each, and waits
for each byte as long as the socket timeout allows, so a client dribbling one byte every few
seconds (slowloris) holds a connection and a greenlet for as long as it likes, and a body
that stalls ends as an unhandled error (500). Here every limit is a setting under
``server.``, the answers are Ollama's (``{"error": ...}``, OpenAI's object on ``/v1``):

- a header line that is not ``name: value`` (folded, space before the colon), two different
  Content-Lengths, a Transfer-Encoding other than ``chunked``, or both a Content-Length and a
  Transfer-Encoding: 400 (request smuggling is made of these) and closed;
- request line over ``maxRequestLineBytes``, headers over ``maxHeaderBytes`` in all or more
  than ``maxHeaderCount`` lines: 431, and the connection is closed (Go's net/http, so Ollama,
  answers 431 for both as well);
- the head not complete within ``headerTimeoutMs`` (counted from the first byte of the
  request, or from the accept for a connection's first request, so a connection that sends
  nothing does not wait for the longer keep-alive timeout): 408 and closed; nothing received
  at all: closed without a word;
- the body slower than ``bodyTimeoutMs`` plus one second per ``bodyMinBytesPerSecond``
  bytes, or no byte of it for ``writeTimeoutMs``: 408 (raised as werkzeug's RequestTimeout,
  so the app's error handler gives it the API's shape) and the connection closed.

A request refused here never reaches the app, let alone a node. The header fields themselves
are parsed in ``app/headfields.py``. A body that came with its head is read without a timer
(it cannot stall).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from typing import Any

import gevent
from gevent.pywsgi import Input
from werkzeug.exceptions import ClientDisconnected, HTTPException, RequestTimeout

from app.errors import error_body

log = logging.getLogger("ollama_lb.intake")

DISCARD_MAX = 65_536  # an unread body up to this is read to keep the connection; more: close
PIECE = 65_536  # a body is read in pieces this big: the deadline moves between them
REASONS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}


def error_reply(status: int, message: str, path: str = "") -> bytes:
    """A whole HTTP response (Connection: close) in the API's error shape for ``path``."""
    body = json.dumps(error_body(status, message, path)).encode()
    head = (f"HTTP/1.1 {status} {REASONS.get(status, 'Error')}\r\n"
            "Content-Type: application/json; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + body


class HeadRejected(ValueError):
    """A request head over a limit (pywsgi treats a ValueError from parsing as the client's)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def reply(self, path: str = "") -> tuple[str, bytes]:
        """What pywsgi's handle() sends before it closes the connection."""
        return str(self.status), error_reply(self.status, self.message, path)


class Deadline(BaseException):
    """Raised by a head or body timer. A BaseException, like gevent.Timeout, so that no
    ``except Exception`` on the way can mistake it for a parsing problem."""


class BodyTimeout(RequestTimeout):
    """408 in the API's shape (via the app's HTTPException handler); the connection closes."""


class DeadlineInput(Input):
    """pywsgi's request body stream, with a deadline that moves with the bytes received.

    A body has ``bodyTimeoutMs`` plus one second per ``bodyMinBytesPerSecond`` bytes received
    so far (Apache's mod_reqtimeout ``MinRate``): a large upload at a decent rate is never
    cut, a slow-POST attacker trickling bytes is. The deadline moves during one large
    ``read()`` too: with a Content-Length as the bytes come, when chunked every ``PIECE``
    bytes. Falling behind, or no byte for the socket timeout (``writeTimeoutMs``), raises
    BodyTimeout; a client that hangs up
    mid-body raises werkzeug's ClientDisconnected (400) instead of an OSError that would
    surface as a 500. Either way ``broken`` is set and the handler closes the connection
    once the answer is out: the stream's position is unknown.
    """

    __slots__ = ("broken", "min_rate", "ready", "received", "started", "timeout_s")

    def __init__(self, rfile: Any, content_length: int | None, *, socket: Any = None,
                 chunked_input: bool = False, timeout_ms: int = 60_000,
                 min_rate: int = 65_536, ready: int = 0) -> None:
        super().__init__(rfile, content_length, socket=socket, chunked_input=chunked_input)
        self.timeout_s = timeout_ms / 1000.0
        self.min_rate = min_rate
        self.started = time.monotonic()
        self.received = 0
        self.broken = False
        # bytes of the body known to be in rfile's buffer (they came with the head): reading
        # them cannot stall, so it needs no deadline. Only with a Content-Length; 0: none
        # known (a read of nothing is all that is served without a deadline then).
        self.ready = ready if content_length is not None and not chunked_input else 0

    def read(self, length: int | None = None) -> bytes:
        if length is not None and length < 0:
            length = None
        if not self.broken and self.content_length is not None and not self.chunked_input:
            left = self.content_length - self.position
            if length is None or length > left:
                length = left
            if length <= self.ready:
                return self._buffered(length)
        self.ready = 0  # what stays buffered is not counted from here on
        with self._guard():
            if not self.chunked_input:
                return self._do_read(length)
            parts = []  # chunked: pieces of PIECE, the deadline checked between them
            while length is None or length > 0:
                data = self._timed(self._chunked_read, PIECE if length is None
                                   else min(PIECE, length))
                if not data:
                    break
                parts.append(data)
                if length is not None:
                    length -= len(data)
            return b"".join(parts)

    def _buffered(self, length: int) -> bytes:
        """``length`` bytes of those already buffered: no timer, no guard (about twenty
        calls fewer than a timed read; the rest of the body, if any, is read timed)."""
        if self.socket is not None:
            self._send_100_continue()  # as pywsgi does before a body's first read
        self.position += length
        self.received += length
        self.ready -= length
        return self.rfile.read(length) if length else b""

    def readline(self, size: int | None = None) -> bytes:
        self.ready = 0
        with self._guard():
            return self._timed(super().readline, size)

    def _do_read(self, length: int | None = None, use_readline: bool = False) -> bytes:
        """pywsgi's Content-Length read, but as the bytes come (``read1``), so that the
        deadline follows every piece received."""
        if use_readline or self.content_length is None:
            return super()._do_read(length, use_readline)
        self._send_100_continue()
        left = self.content_length - self.position
        length = left if length is None else min(length, left)
        parts = []
        while length > 0:
            data = self._timed(self.rfile.read1, min(length, PIECE))
            if not data:
                raise OSError(f"unexpected end of file at position {self.position}")
            self.position += len(data)
            length -= len(data)
            parts.append(data)
        return b"".join(parts)

    def _timed(self, fn: Any, arg: int | None) -> bytes:
        """``fn(arg)`` within the deadline the bytes received so far allow."""
        deadline = self.started + self.timeout_s + self.received / self.min_rate
        with gevent.Timeout(max(deadline - time.monotonic(), 0.001), Deadline):
            data: bytes = fn(arg)
        self.received += len(data)
        return data

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        """Late or stalled: BodyTimeout; the client gone or the framing broken: 400."""
        if self.broken:
            raise self._late()
        try:
            yield
        except (Deadline, TimeoutError):
            raise self._late() from None
        except OSError:  # EOF before Content-Length, a reset, a bad chunk: the client's fault
            self.broken = True
            raise ClientDisconnected("the client did not send the whole request body"
                                     ) from None

    def _late(self) -> BodyTimeout:
        self.broken = True
        took = round((time.monotonic() - self.started) * 1000)
        return BodyTimeout(f"request body not received in time: {self.received} bytes in "
                           f"{took} ms (the floor is {self.min_rate} bytes/s after the first "
                           f"{round(self.timeout_s * 1000)} ms)")

    def unread_too_big(self) -> bool:
        """More of a declared body is unread than is worth reading to keep the connection."""
        return (self.content_length or 0) - self.position > DISCARD_MAX

    def _discard(self) -> None:
        """Read what the app left unread, if it is small; otherwise close the connection.

        pywsgi reads any unread body to keep the connection usable; for a client that sent
        ``Content-Length: 10G`` and got a 413, that would be 10 GB read for nothing.
        """
        if self.content_length is not None and self.position >= self.content_length:
            return  # all of it read: nothing to discard (what pywsgi's read would find)
        if self.broken or self.unread_too_big():
            self.broken = True
            return
        self.send_100_continue_enabled = False  # nobody wants the body: do not ask for it
        try:
            got = 0
            while got <= DISCARD_MAX:
                data = self.read(16384)
                if not data:
                    return
                got += len(data)
            self.broken = True
        except HTTPException:
            self.broken = True


class Throttled:
    """A log line at most every ``every_s`` seconds, with how many were left out."""

    def __init__(self, logger: logging.Logger, every_s: float = 10.0) -> None:
        self.logger = logger
        self.every_s = every_s
        self.at = -every_s
        self.left_out = 0

    def warning(self, message: str, **extra: Any) -> None:
        now = time.monotonic()
        if now - self.at < self.every_s:
            self.left_out += 1
            return
        self.logger.warning(message, extra={**extra, "left_out": self.left_out})
        self.at, self.left_out = now, 0
