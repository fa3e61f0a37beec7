"""Writing a reply to a client: pywsgi's handler, with fewer sends and a bounded write.

The head and a small first piece leave in one send; after it, each piece of a chunked reply
(a stream's every line) is framed and sent in one step; what the kernel takes at once goes
through the plain socket's own ``send``. ``server.writeTimeoutMs`` bounds each wait for
progress, not the whole write, so a big reply to a slow but reading client is fine and a
client that takes nothing ends its request (``handle_error``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from typing import Any

from gevent.pywsgi import WSGIHandler

from app.connlimit import client_ip
from app.intake import DeadlineInput
from app.netutil import linger_rst

log = logging.getLogger("ollama_lb.server")

#: a first piece up to this size leaves with the reply's head in one send; larger ones are
#: sent on their own rather than copied
ONE_WRITE = 256 * 1024


class ReplyWriter(WSGIHandler):
    """The writing half of a client connection's handler (``app.transport.ClientHandler``)."""

    server: Any  # app.transport.ApplianceServer: its settings() and draining flag
    held: bytearray | None = None  # what _sendall gathers while the head is written
    wsgi_input: DeadlineInput | None = None
    #: the plain socket's own send (None under TLS, where only the SSL socket may write)
    raw_send: Callable[[Any], int] | None = None

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        body = self.wsgi_input
        broken = body is not None and (body.broken or body.unread_too_big())
        if self.server.draining or broken:  # next request: the next process, or a clean start
            self.close_connection = True
            if not any(k.lower() == "connection" for k, _ in headers):
                headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _write_with_headers(self, data: bytes) -> None:
        """pywsgi's, but the head and a first piece of up to ``ONE_WRITE`` bytes leave in one
        send: on a complete reply that is one segment and one wake-up of the client instead
        of two. pywsgi writes them itself; ``_sendall`` only holds them until it is done."""
        if not data or len(data) > ONE_WRITE:
            super()._write_with_headers(data)
            return
        self.held = bytearray()
        try:
            super()._write_with_headers(data)
        finally:
            out, self.held = self.held, None
        self._sendall(out)

    def process_result(self) -> None:
        """pywsgi's, but after the first piece (which carries the head) each chunk of a chunked
        reply is framed and sent in one step: a stream's every line would otherwise pass
        through pywsgi's ``write`` and ``_write`` and a bytearray built per line."""
        pieces = iter(self.result)
        for data in pieces:
            if data:
                self.write(data)
                break
        if not (self.headers_sent and self.response_use_chunked):
            for data in pieces:
                if data:
                    self.write(data)
            if self.status and not self.headers_sent:  # an empty reply: its head alone
                self.write(b"")
            if self.response_use_chunked:
                self._sendall(b"0\r\n\r\n")
            return
        sendall = self._sendall
        # a relayed stream on a plain socket is relayed from the hub's loop between pieces
        pump = getattr(self.result, "pump", None) if self.raw_send is not None else None
        if pump is not None:
            self._pump(pump)
        for data in pieces:
            if data:
                sendall(b"%x\r\n%b\r\n" % (len(data), data))
            if pump is not None:
                self._pump(pump)
        sendall(b"0\r\n\r\n")

    def _pump(self, pump: Callable[[Callable[[bytes], bytes]], bytes | None]) -> None:
        """Let the body relay from the hub's loop; write, waiting, what the client could not
        take at once, then let it go on. Returns when the iteration must go on."""
        while (left := pump(self._offer)) is not None:
            self._sendall(left)

    def _offer(self, data: bytes) -> bytes:
        """One chunk, framed and sent as far as the kernel takes it now; what it did not take.

        Called from the hub's loop (``StreamRelay.pump``): it never waits.
        """
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        try:
            sent = self.raw_send(frame)  # type: ignore[misc]  # pumped only on a plain socket
        except BlockingIOError:
            sent = 0
        except OSError as ex:
            self._write_failed(ex)
            raise
        self.response_length += sent
        return frame[sent:] if sent < len(frame) else b""

    def _write_failed(self, ex: OSError) -> None:
        self.status = f"socket error: {ex}"
        if self.code > 0:
            self.code = -self.code

    def _sendall(self, data: bytes) -> None:
        """Like pywsgi's, but the timeout bounds each wait for progress, not the whole write.

        A big reply to a slow but reading client is fine; a client that takes nothing for
        ``writeTimeoutMs`` raises TimeoutError here. What the kernel takes at once (a stream's
        line, nearly always) is sent by the plain socket's own ``send``, without gevent's
        wrapper; only a remainder waits, through gevent, for room.
        """
        if self.held is not None:  # the head and first piece, gathered for one send
            self.held += data
            return
        view: Any = data
        try:
            if self.raw_send is not None:
                try:
                    sent = self.raw_send(data)
                except BlockingIOError:
                    sent = 0
                if sent == len(data):
                    self.response_length += sent
                    return
                view = memoryview(data)[sent:]
            else:
                view = memoryview(data)
            while view:
                view = view[self.socket.send(view):]
        except OSError as ex:
            self._write_failed(ex)
            raise
        self.response_length += len(data)

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        if not isinstance(v, TimeoutError):
            super().handle_error(t, v, tb)
            return
        self.close_connection = True
        with contextlib.suppress(OSError):
            linger_rst(self.socket)  # the client takes nothing: drop what is queued for it
        log.warning("client took nothing of the reply; request ended", extra={
            "event": "client_timeout", "client": client_ip(self.client_address),
            "path": self.path, "sent_bytes": self.response_length,
            "write_timeout_ms": self.server.settings().writeTimeoutMs})

    def log_request(self) -> None:
        pass  # pywsgi's own access log is replaced by the structured one
