"""The stream relay: a node's stream, line by line, to the caller, cleaned up exactly once.

Once a stream has started nothing can be retried; a failure ends it with one error line in
the stream's own format (Ollama NDJSON ``{"error"}`` or an OpenAI SSE error frame), never a
silent truncation. ``close()`` closes the upstream response (a node sees its client leave and
stops generating), gives the node slot back and finishes the request in the ledger.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Callable, Iterator

from pipeline.lease import Lease
from pipeline.ledger import Ledger
from pipeline.request import Ticket
from pipeline.upstream import TRANSPORT_ERRORS, UpstreamResponse, describe, whole_lines


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
        live.add(self)

    def lines(self) -> Iterator[bytes]:
        try:
            for piece in whole_lines(self.resp.iter_content()):
                self.last_line = piece
                if self.ndjson and not (piece.startswith(b"{") and piece.endswith(b"}\n")):
                    reason = f"node {self.node.id}: malformed line in the stream"
                    self.lease.failed(reason)
                    self.outcome = "STREAM_BROKEN"
                    self.complete = True
                    yield self.error_line(reason)
                    return
                if piece.startswith(b'{"error"'):
                    self.lease.failed(f"node {self.node.id}: error in stream")
                    self.outcome = "STREAM_ERROR"
                yield piece
            self.complete = True
        except TRANSPORT_ERRORS as exc:
            self.complete = True
            if self.cut_reason is not None:  # the appliance ended it: not the node's fault
                self.outcome = "CUT"
                yield self.error_line(self.cut_reason)
                return
            reason = f"node {self.node.id}: {describe(exc)} during the stream"
            self.lease.failed(reason)
            self.outcome = "STREAM_BROKEN"
            yield self.error_line(reason)

    def cut(self, reason: str) -> None:
        """End the stream from outside (shutdown): the reader gets one error line, then EOF.

        Closing the upstream connection wakes the greenlet blocked reading it with an error,
        which ``lines()`` turns into the error line.
        """
        if self.closed or self.complete:
            return
        self.cut_reason = reason
        # shut the socket down rather than close the response: closing its reader under the
        # greenlet blocked in it raises there (reentrant call) instead of ending the read
        sock = getattr(self.resp.raw.connection, "sock", None)
        if sock is None:
            self.resp.raw.close()
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def error_line(self, message: str) -> bytes:
        """One final error line: native ``{"error"}`` or an OpenAI SSE error frame."""
        ep = self.ticket.endpoint
        if ep is not None and ep.openai:
            frame = {"error": {"message": message, "type": "api_error", "param": None,
                               "code": None}}
            return b"data: " + json.dumps(frame).encode() + b"\n\n"
        return json.dumps({"error": message}).encode() + b"\n"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.live.discard(self)
        if not self.complete:
            self.outcome = "CANCELLED"  # the caller stopped reading: the node call is cut
        try:
            self.resp.close()
        finally:
            self.release(self.lease)
            self.ledger.observe_body(self.ticket, self.last_line)
            self.ledger.finish(self.ticket, self.outcome)
