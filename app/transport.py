"""Client connections: pywsgi's handler and server with timeouts, limits, TLS and a drain.

A socket timeout per phase, because waiting for the next request on a kept-alive connection
and waiting for a client to take a reply are different things. Idle between requests:
``server.keepAliveTimeoutMs``, then the connection is closed. During a request:
``server.writeTimeoutMs`` without progress on the socket ends the request, which closes the
node's stream and frees its slot (the WSGI iterable's close() does that), so a client that
stops reading cannot hold a GPU slot forever. Receiving a request is bounded as well (size
and count of the head: ``app.headfields``; deadlines for head and body: ``app.intake``),
connections per client address are capped (``app.connlimit``), and with ``server.tls`` each
accepted socket is wrapped with the current certificate (``app.tls``) before anything is read
from it.

Writing the reply (fewer sends, the write timeout) is ``app.replywriter``'s half of the
handler.

Draining (SIGTERM): the server stops accepting, idle kept-alive connections are closed, and
what is already on a connection is answered with ``Connection: close``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent import socket as gsocket
from gevent.pywsgi import WSGIHandler, WSGIServer, unquote_latin1

from app.connlimit import ConnectionLimiter, client_ip
from app.headfields import Fields, Head, read_fields, whole_head
from app.intake import Deadline, DeadlineInput, HeadRejected, Throttled, error_reply
from app.netutil import linger_rst, tune_accepted
from app.replywriter import ReplyWriter
from app.tls import TlsTerminator
from pipeline.config import ServerConfig

log = logging.getLogger("ollama_lb.server")

FRESH_S = 2.0  # a new connection gets this long to send its first request during a drain
#: ... and a kept-alive one this long after its last reply to send its next: a client that
#: sends as soon as it has a reply must not have the connection closed under that request (one
#: that waits longer sees the close before it sends, as at the keep-alive timeout)
NEXT_S = 0.25
BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain; charset=utf-8\r\n"
               b"Connection: close\r\nContent-Length: 15\r\n\r\n400 Bad Request")  # as Go


class ClientHandler(ReplyWriter):
    """One client connection: per-phase timeouts, bounded intake, a drain-aware keep-alive."""

    server: ApplianceServer
    # ETIMEDOUT: TCP keepalive probes found the client gone; as quiet as a reset
    ignored_socket_errors = (*WSGIHandler.ignored_socket_errors, errno.ETIMEDOUT)
    idle = False  # waiting for a request line: safe to close at shutdown
    requests_read = 0  # requests read on this connection
    idle_since = 0.0  # when it last began to wait for a request
    accepted_at = 0.0  # set by the server before a TLS handshake; else when handling starts
    head_timer: gevent.Timeout | None = None  # running from a request's first byte to its head
    headers: Fields
    limits: ServerConfig  # the server settings, read once per request
    head: Head | None = None  # the head, when it arrived whole and was parsed in one pass
    ready = 0  # bytes after the head already in rfile's buffer (a one-pass head only)

    def handle(self) -> None:
        tune_accepted(self.socket)
        if type(self.socket) is gsocket.socket:
            self.raw_send = self.socket._sock.send
        self.accepted_at = self.accepted_at or time.monotonic()
        self.greenlet = gevent.getcurrent()
        self.server.connections.add(self)
        try:
            super().handle()
        except OSError:  # the client left while its refused request was being answered
            pass
        finally:
            self.server.connections.discard(self)
            self._stop_head_timer()

    # --- reading a request ----------------------------------------------------------------------

    def handle_one_request(self) -> Any:
        """pywsgi's, with the head bounded in size and time; True, None or (status, reply)."""
        if self.rfile.closed:
            return None
        self.path = None
        try:
            outcome = self._read_head()
        finally:
            if self.head_timer is not None:
                self._stop_head_timer()
        if outcome is not True:
            return outcome  # None: close quietly; (status, reply): answer, then close
        self.environ = self.get_environ()
        self.application = self.server.application
        self.handle_one_response()
        if self.close_connection or self.rfile.closed or (
                self.wsgi_input is not None and self.wsgi_input.broken):
            return None
        return True

    def _read_head(self) -> Any:
        """Read the request line and headers: True, or what handle_one_request returns."""
        try:
            self.requestline = self.read_requestline()
            if not self.requestline:
                return None
            self.response_length = 0
            self.read_request(self.requestline)
            return True
        except HeadRejected as ex:
            return ex.reply(self.path or "")
        except (Deadline, TimeoutError):
            ms = self.server.settings().headerTimeoutMs
            return "408", error_reply(408, "request timeout: the request head was not "
                                           f"received within {ms} ms", self.path or "")
        except OSError:  # a reset mid-head: nobody to answer
            return None
        except Exception as ex:  # malformed: pywsgi raises ValueError and friends
            return self._handle_client_error(ex)

    def read_requestline(self) -> str:
        """Wait for a request (keep-alive timeout), then read its line under the head deadline.

        A connection's first request has the head deadline from the accept on, so one that
        sends nothing is closed after ``headerTimeoutMs``, not the longer keep-alive timeout.
        A head that is already here whole is parsed at once (``whole_head``, for
        ``read_request``) when it is plain; any other is read line by line as before.
        """
        s = self.limits = self.server.settings()
        self.head = None
        self.ready = 0
        if self.server.draining and self.requests_read and not self.pending():
            return ""  # draining: a kept-alive connection with nothing sent is closed
        first = not self.requests_read
        head_s = s.headerTimeoutMs / 1000.0
        self.idle_since = now = time.monotonic()
        self.idle = True
        try:
            left = self.accepted_at + head_s - now
            self.socket.settimeout(max(left, 0.001) if first else s.keepAliveTimeoutMs / 1000.0)
            arrived = self.rfile.peek(1)
            if not arrived:
                return ""  # EOF
        except OSError:  # nothing sent in time, or a reset: closed without a word
            return ""
        finally:
            self.idle = False
        end = arrived.find(b"\r\n\r\n")
        if end < 0 and b"\n\n" not in arrived:
            # the head is still coming: it has until the deadline (a whole head already
            # read into the buffer cannot stall, so it needs no timer)
            start = self.accepted_at if first else time.monotonic()
            self.head_timer = gevent.Timeout.start_new(
                max(start + head_s - time.monotonic(), 0.001), Deadline)
        self.socket.settimeout(s.writeTimeoutMs / 1000.0)
        self.requests_read += 1
        if end >= 0:  # the whole head is here: parsed at once if it is plain
            self.head = whole_head(arrived, end, s.maxRequestLineBytes, s.maxHeaderBytes,
                                   s.maxHeaderCount)
            if self.head is not None:
                self.rfile.read(end + 4)  # from the buffer: what was parsed
                self.ready = len(arrived) - end - 4
                return self.head.requestline
        line = self.rfile.readline(s.maxRequestLineBytes + 1)
        if len(line) > s.maxRequestLineBytes:
            raise HeadRejected(431, "request line too long: the limit is "
                                    f"{s.maxRequestLineBytes} bytes")
        return line.decode("latin-1")

    def read_request(self, raw_requestline: str) -> bool:
        """pywsgi's, for a head parsed in one pass (``whole_head``: three words, HTTP/1.0 or
        1.1, fields checked): the same attributes set, the same refusals, fewer calls."""
        head = self.head
        if head is None:
            return bool(super().read_request(raw_requestline))
        self.requestline, self.command, self.path, self.request_version, fields = head
        self.headers = fields
        # whole_head checked the framing: a length is digits and never beside a coding
        first = fields.first
        length: int | None = None
        if "content-length" in first:
            length = int(first["content-length"])
            if length and self.command == "HEAD":
                raise ValueError("Unexpected Content-Length")
        self.content_length = length
        conn = first["connection"].lower() if "connection" in first else ""
        if self.request_version == "HTTP/1.1":
            self.close_connection = conn == "close"
        else:
            self.close_connection = (conn or "close") != "keep-alive"
        return True

    def MessageClass(self, fp: Any, *_: Any) -> Any:  # pywsgi calls it by this name
        s = self.limits
        return read_fields(fp, s.maxHeaderBytes, s.maxHeaderCount)

    def _stop_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.close()
            self.head_timer = None

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        """A malformed request: Go's plain 400 and close; logged without a traceback."""
        self.server.bad_requests.warning("malformed request refused", event="bad_request",
                                         client=client_ip(self.client_address),
                                         reason=str(ex)[:200] or type(ex).__name__)
        return "400", BAD_REQUEST

    def get_environ(self) -> dict[str, Any]:
        """pywsgi's environ, with the ``HTTP_`` entries the fields made as they were parsed
        (pywsgi makes them again, some six calls per field), the body given its deadline
        (``DeadlineInput``), and the client's socket, so that a waiting view can watch it."""
        env = self.server.get_environ()
        fields = self.headers
        first = fields.first
        path, query = self.path, ""
        if "?" in path:
            path, query = path.split("?", 1)
        env["REQUEST_METHOD"] = self.command
        env["SCRIPT_NAME"] = ""
        env["PATH_INFO"] = unquote_latin1(path) if "%" in path else path
        env["QUERY_STRING"] = query
        if "content-type" in first:
            env["CONTENT_TYPE"] = first["content-type"]
        length = first.get("content-length")
        if length:  # pywsgi leaves an empty one out
            env["CONTENT_LENGTH"] = length
        env["SERVER_PROTOCOL"] = self.request_version
        address = self.client_address
        if isinstance(address, tuple):
            env["REMOTE_ADDR"] = str(address[0])
            env["REMOTE_PORT"] = str(address[1])
        env.update(fields.environ)
        upgrade = ("connection" in first and first["connection"].lower() == "upgrade") or (
            "upgrade" in first and first["upgrade"].lower() == "websocket")
        expect = "HTTP_EXPECT" in env and env["HTTP_EXPECT"] == "100-continue"
        chunked = "HTTP_TRANSFER_ENCODING" in env and (
            env["HTTP_TRANSFER_ENCODING"].lower() == "chunked")
        s = self.limits
        self.wsgi_input = DeadlineInput(
            self.rfile, self.content_length, socket=self.socket if expect else None,
            chunked_input=chunked, timeout_ms=s.bodyTimeoutMs,
            min_rate=s.bodyMinBytesPerSecond, ready=0 if upgrade else self.ready)
        env["wsgi.input"] = self.rfile if upgrade else self.wsgi_input
        env["wsgi.input_terminated"] = not upgrade
        env["ollama_lb.socket"] = self.socket
        return env

    # --- idle connections and the drain ---------------------------------------------------------

    def pending(self) -> bool:
        """Bytes (or EOF) waiting to be read: the client may have sent its next request."""
        if getattr(self.socket, "pending", None) and self.socket.pending():
            return True  # TLS: bytes already decrypted
        try:
            return bool(select.select([self.socket.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def in_grace(self, now: float) -> bool:
        """Waiting for its next request so soon after a reply that one may be on its way."""
        return self.idle and bool(self.requests_read) and now - self.idle_since < NEXT_S

    def close_if_idle(self, now: float) -> None:
        """Close a kept-alive connection that is waiting, past its grace, and has nothing sent
        (shutdown)."""
        if self.idle and self.requests_read and not self.in_grace(now) and not self.pending():
            with contextlib.suppress(OSError):
                # the TCP socket's shutdown, also under TLS (SSLSocket.shutdown would drop the
                # SSL object under the waiting read): the read sees EOF
                gsocket.socket.shutdown(self.socket, socket.SHUT_RDWR)


class ApplianceServer(WSGIServer):
    """pywsgi's server, knowing its connections so that a shutdown can drain them."""

    def __init__(self, listener: Any, application: Any,
                 settings: Callable[[], ServerConfig], tls: TlsTerminator | None = None
                 ) -> None:
        super().__init__(listener, application, handler_class=ClientHandler, log=None,
                         error_log=logging.getLogger("ollama_lb.wsgi"),
                         environ={"wsgi.url_scheme": "https"} if tls else None)
        self.settings = settings
        self.tls = tls
        if os.environ.get("OLLAMA_LB_WORKER"):
            # workers share one listening socket: accepting one connection per wake-up (not
            # gevent's 100) lets every worker take its part of a burst of kept-alive clients
            self.max_accept = 1
        self.limiter = ConnectionLimiter(settings)
        self.connections: set[ClientHandler] = set()
        self.draining = False
        self.bad_requests = Throttled(log)
        self.refusals = Throttled(log)

    def handle(self, sock: Any, address: Any) -> None:
        """One accepted connection: the per-client cap, then TLS, then HTTP."""
        accepted = time.monotonic()
        ip = client_ip(address)
        if not self.limiter.admit(ip):
            with contextlib.suppress(OSError):
                linger_rst(sock)  # closed at once, nothing read (see app/connlimit.py)
            self.refusals.warning("connection refused: too many from this client", event=
                                  "connection_refused", client=ip,
                                  cap=self.settings().maxConnectionsPerClient,
                                  refused_total=self.limiter.refused)
            return
        try:
            if self.tls is not None:
                left = accepted + self.settings().headerTimeoutMs / 1000.0 - time.monotonic()
                sock = self.tls.handshake(sock, left, ip)
                if sock is None:
                    return
            handler = self.handler_class(sock, address, self)
            handler.accepted_at = accepted
            handler.handle()
        finally:
            self.limiter.release(ip)

    def begin_drain(self) -> None:
        """Stop accepting; idle kept-alive connections close (those that had a reply within
        ``NEXT_S`` once that has passed), busy ones after this reply."""
        self.draining = True
        self.close()
        now = time.monotonic()
        for handler in list(self.connections):
            handler.close_connection = True
            handler.close_if_idle(now)

    def busy(self, now: float) -> int:
        """Connections in a request, or new ones whose first request may be on its way."""
        return sum(1 for h in self.connections if not h.idle or h.in_grace(now) or (
            not h.requests_read and now - h.accepted_at < FRESH_S))

    def wait_quiet(self, deadline: float, in_flight: Callable[[], int]) -> None:
        """Until nothing is in flight or busy (or the deadline); kept-alive connections are
        closed as their grace ends."""
        while True:
            now = time.monotonic()
            for handler in list(self.connections):
                handler.close_if_idle(now)
            if not (in_flight() > 0 or self.busy(now)) or now >= deadline:
                return
            gevent.sleep(0.05)

    def kill_connections(self) -> None:
        gevent.killall([h.greenlet for h in list(self.connections)], timeout=1)
