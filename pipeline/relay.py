"""The stream relay: a node's stream, line by line, to the caller, cleaned up exactly once.

Once a stream has started nothing can be retried; a failure ends it with one error line in
the stream's own format (Ollama NDJSON ``{"error"}`` or an OpenAI SSE error frame), never a
silent truncation. ``close()`` closes the upstream response (a node sees its client leave and
stops generating), gives the node slot back and finishes the request in the ledger.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Callable, Iterator
from http.client import HTTPException
from time import monotonic

from gevent import get_hub
from gevent.hub import Waiter

from pipeline.chunked import ChunkedReader
from pipeline.endpoints import stream_error_frame
from pipeline.idle import IdleTimer
from pipeline.lease import Lease
from pipeline.ledger import Ledger
from pipeline.request import Ticket
from pipeline.upstream import TRANSPORT_ERRORS, UpstreamResponse, describe


def whole_lines_before_the_first_bad(piece: bytes) -> bytes:
    """The NDJSON lines of a piece up to the first that is not one JSON object."""
    good = []
    for line in piece.splitlines(keepends=True):
        if not (line.startswith(b"{") and line.endswith(b"}\n")):
            break
        good.append(line)
    return b"".join(good)


def ndjson_objects(piece: bytes) -> bool:
    """Every line of an NDJSON piece is one object: it starts with ``{`` and ends with
    ``}``, so every newline but the last sits between ``}`` and ``{`` (JSON strings hold no
    raw newline): two counts per piece."""
    return (piece.startswith(b"{") and piece.endswith(b"}\n")
            and piece.count(b"\n") == piece.count(b"}\n{") + 1)


def plain_piece(piece: bytes, ndjson: bool) -> bool:
    """Nothing in a piece of whole lines for ``StreamRelay._check`` to act on: no error frame
    and, on NDJSON, every line one object."""
    if not ndjson:
        return b'{"error"' not in piece
    return (ndjson_objects(piece) and not piece.startswith(b'{"error"')
            and b'\n{"error"' not in piece)


class StreamRelay:
    """Relays one node stream; registered in ``live`` until closed."""

    def __init__(self, ticket: Ticket, lease: Lease, resp: UpstreamResponse, ledger: Ledger,
                 release: Callable[[Lease], None], live: set[StreamRelay]) -> None:
        self.ticket = ticket
        self.lease = lease
        self.node = lease.node
        self.resp = resp
        self.ledger = ledger
        self.release = release
        self.live = live
        self.outcome = str(resp.status_code)
        self.ndjson = "ndjson" in resp.headers.get("Content-Type", "")
        self.last_line = b""
        self.complete = False  # the node's stream was read to its end
        self.closed = False
        self.cut_reason: str | None = None  # set by cut(): why the appliance ended the stream
        self.idle: IdleTimer | None = None  # bounds the silence between pieces (watch_idle)
        self._reader: ChunkedReader | None = None  # a plain socket's chunked body (pump)
        #: ``lines()`` waits at a piece with no fragment left over: ``pump`` may take over
        self._between = False
        #: what the hub's relay read and left to ``lines()``: data, b"" (the end) or an error
        self._handed: bytes | Exception | None = None
        self._pumping: Waiter | None = None  # the caller's greenlet, parked in pump()
        live.add(self)

    def lines(self) -> Iterator[bytes]:
        """The stream's complete lines, as many as have arrived in one piece per read."""
        idle, pending, ndjson = self.idle, b"", self.ndjson
        try:
            self._reader = self.resp.stream_reader()
            read = self._read_handed if self._reader is not None else self.resp.body_reader()
            while data := read():
                if idle is not None:
                    idle.last = monotonic()  # the silence starts again (IdleTimer.last)
                end = data.rfind(b"\n")
                if end < 0:
                    pending += data
                    continue
                piece = pending + data[: end + 1] if pending else data[: end + 1]
                pending = data[end + 1 :]
                if plain_piece(piece, ndjson):
                    self.last_line = piece
                elif (problem := self._check(piece)) is not None:
                    if good := whole_lines_before_the_first_bad(piece):
                        yield good
                    yield problem
                    return
                self._between = not pending
                yield piece
                self._between = False
            if pending:  # a trailing fragment with no newline
                yield pending
            if self._interrupted():
                raise ConnectionError("the stream ended early")
            self.complete = True
        except (*TRANSPORT_ERRORS, HTTPException) as exc:
            yield self._broken(exc)

    def _read_handed(self) -> bytes:
        """The next data of a plain socket's body: first what the hub's relay left here."""
        handed = self._handed
        if handed is None:
            return self._reader.read()  # type: ignore[union-attr]  # set with this reader
        self._handed = None
        if isinstance(handed, Exception):
            raise handed
        return handed

    def pump(self, offer: Callable[[bytes], bytes]) -> bytes | None:
        """Relay from the hub's loop, with no greenlet switch per piece, while pieces are plain.

        The caller's greenlet waits here while a watcher on the node's socket ``offer``s every
        plain piece (whole lines with nothing to check) to the client as it arrives. It returns
        what was left of the first piece the client could not take at once (the caller writes
        it, waiting, and pumps again), or None at anything else (the end, an error, a piece to
        check or with a fragment to keep), which is left for ``lines()``: the caller goes on
        iterating, and every such piece meets the same checks and cleanup as ever. A failed
        ``offer`` raises here.
        """
        reader, sock = self._reader, self.resp.socket()
        if not self._between or self.closed or reader is None or sock is None:
            return None  # (_between: lines() has read once, so the head's leftovers are taken)
        if reader.more:  # a read now would not wait: lines() reads
            return None
        hub = get_hub()
        waiter = self._pumping = Waiter(hub)
        watcher = hub.loop.io(sock.fileno(), 1)
        watcher.start(self._on_readable, reader, waiter, offer)
        try:
            return waiter.get()  # type: ignore[no-any-return]
        finally:
            self._pumping = None
            watcher.close()

    def _on_readable(self, reader: ChunkedReader, waiter: Waiter,
                     offer: Callable[[bytes], bytes]) -> None:
        """The watcher's callback, in the hub: what has arrived, offered while it is plain.

        Never waits and never raises (an exception here would only be printed by the hub):
        whatever ends the stretch wakes the caller, and nothing runs here after that.
        """
        idle, ndjson = self.idle, self.ndjson
        while True:
            try:
                data = reader.read_now()
            except Exception as exc:  # lines() reports it as one of its own reads would
                self._handed = exc
                waiter.switch(None)
                return
            if data is None:
                return  # part of a chunk: the rest is still on its way
            if not (data.endswith(b"\n") and plain_piece(data, ndjson)):
                self._handed = data  # (b"" at the end)
                waiter.switch(None)
                return
            if idle is not None:
                idle.last = monotonic()
            self.last_line = data
            try:
                left = offer(data)
            except Exception as exc:  # the client's side failed: raised where the caller waits
                waiter.throw(exc)
                return
            if left:
                waiter.switch(left)
                return
            if not reader.more:
                return

    def _check(self, piece: bytes) -> bytes | None:
        """None for a good piece; else the error line that ends the stream.

        A piece holds every line that arrived in one read; on NDJSON each must be one object
        (``ndjson_objects``).
        """
        self.last_line = piece
        if self.ndjson and not ndjson_objects(piece):
            reason = f"node {self.node.id}: malformed line in the stream"
            self.lease.failed(reason)
            self.outcome = "STREAM_BROKEN"
            self.complete = True
            return self.error_line(reason)
        if piece.startswith(b'{"error"') or b'\n{"error"' in piece:
            self.lease.failed(f"node {self.node.id}: error in stream")
            self.outcome = "STREAM_ERROR"
        return None

    def _interrupted(self) -> bool:
        return self.cut_reason is not None or (self.idle is not None and self.idle.expired)

    def _broken(self, exc: BaseException) -> bytes:
        """The stream failed: the one error line that ends it (not the node's fault if cut)."""
        self.complete = True
        if self.cut_reason is not None:  # the appliance ended it: not the node's fault
            self.outcome = "CUT"
            return self.error_line(self.cut_reason)
        why = "read timed out" if self.idle is not None and self.idle.expired else describe(exc)
        reason = f"node {self.node.id}: {why} during the stream"
        self.lease.failed(reason)
        self.outcome = "STREAM_BROKEN"
        return self.error_line(reason)

    def watch_idle(self, idle_s: float) -> None:
        """Bound the silence between two pieces of the stream by one lazily re-armed timer."""
        self.resp.set_read_timeout(None)
        self.idle = IdleTimer(idle_s, self._shut)

    def _shut(self) -> None:
        """Wake the greenlet reading the node with an error (shutdown, not close: closing the
        reader under a greenlet blocked in it raises there instead of ending the read)."""
        sock = self.resp.socket()
        if sock is None:
            self.resp.abort()
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def cut(self, reason: str) -> None:
        """End the stream from outside (shutdown): the reader gets one error line, then EOF.

        Closing the upstream connection wakes the greenlet blocked reading it with an error,
        which ``lines()`` turns into the error line.
        """
        if self.closed or self.complete:
            return
        self.cut_reason = reason
        self._shut()

    def error_line(self, message: str) -> bytes:
        """One final error frame in the stream's own format: native ``{"error"}``, OpenAI's
        SSE error frame, a Responses ``error`` event or an Anthropic ``event: error``."""
        return stream_error_frame(self.ticket.endpoint, message, self.last_line)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.live.discard(self)
        if (waiter := self._pumping) is not None:  # not from the caller's own greenlet
            self._pumping = None
            get_hub().loop.run_callback(waiter.switch, None)
        if self.idle is not None:
            self.idle.cancel()
        if not self.complete:
            self.outcome = "CANCELLED"  # the caller stopped reading: the node call is cut
        try:
            self.resp.close()
        finally:
            self.release(self.lease)
            self.ledger.observe_body(self.ticket, self.last_line)
            self.ledger.finish(self.ticket, self.outcome)
