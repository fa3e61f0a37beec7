"""Model management requests (pull, create, blobs, copy, delete) in the pipeline's books.

They do not go through the ring (nothing about them is routed to one node), but an operator
must see them like any other request, and a shutdown must wait for them. So each one is
admitted into the pipeline's ``Ledger`` (it counts in ``pipeline.in_flight``, which the drain
waits on, and its finish runs the finish hooks: the access log line), a streamed one joins the
pipeline's live streams (``cut_streams`` at the drain bound ends it with one error line, as it
ends a chat), and each is counted per operation and outcome
(``ollama_lb_model_operations_total{operation,outcome}``, with its duration).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pipeline.errors import ErrorCode, PipelineError
from pipeline.ledger import Ledger
from pipeline.metrics import MetricsRegistry
from pipeline.modelname import canonical
from pipeline.request import InferenceRequest, Ticket

#: every outcome counted, so that the series exist from the start
OUTCOMES = ("success", "partial", "failed", "client_error", "cancelled", "cut")
OPERATIONS = ("pull", "create", "copy", "delete", "blob_check", "blob_upload")


@dataclass(frozen=True)
class Operation:
    """What the ledger labels a management request's endpoint with."""

    path: str


class ManagementCall:
    """One management request, from arrival to its last byte; ``finish`` exactly once."""

    def __init__(self, owner: Management, operation: str, ticket: Ticket) -> None:
        self.owner = owner
        self.operation = operation
        self.ticket = ticket
        self.stream: Any = None  # a live stream (with ``cut(reason)``) registered for shutdown
        self.done = False

    def started(self) -> None:
        """The first byte goes out (the access log's ttfb)."""
        if self.ticket.first_byte_at is None:
            self.ticket.first_byte_at = time.monotonic()

    def streaming(self, stream: Any) -> None:
        """The reply is a stream that a shutdown past the drain bound must be able to cut."""
        self.stream = stream
        self.owner.streams.add(stream)

    def targets(self, node_ids: list[str]) -> None:
        """The nodes the request went to: one is named in logs and metrics, several are
        ``all`` (a label per combination of nodes would be unbounded)."""
        self.ticket.attempts = len(node_ids)
        self.ticket.node_id = node_ids[0] if len(node_ids) == 1 else "all" if node_ids \
            else None

    def finish(self, outcome: str, status: int | str) -> None:
        if self.done:
            return
        self.done = True
        if self.stream is not None:
            self.owner.streams.discard(self.stream)
        metrics = self.owner.metrics
        metrics.model_operations(self.operation, outcome).inc()
        metrics.model_operation_latency(self.operation).observe(
            time.monotonic() - self.ticket.submitted_at)
        self.owner.ledger.finish(self.ticket, str(status))


class Management:
    """Admits management requests into the ledger and counts them."""

    def __init__(self, ledger: Ledger, metrics: MetricsRegistry, streams: set[Any],
                 accepting: Callable[[], bool]) -> None:
        self.ledger = ledger
        self.metrics = metrics
        self.streams = streams  # the pipeline's live streams (cut at the drain bound)
        self.accepting = accepting
        self.calls: set[ManagementCall] = set()
        for op in OPERATIONS:
            for outcome in OUTCOMES:
                metrics.model_operations(op, outcome)

    @property
    def in_flight(self) -> int:
        """Management requests admitted and not finished (also in ``pipeline.in_flight``)."""
        return sum(1 for c in self.calls if not c.done)

    def begin(self, operation: str, method: str, path: str, model: str = "", *,
              request_id: str, client: str = "", correlation_id: str | None = None,
              stream: bool = False, key: str | None = None) -> ManagementCall:
        """Count a request in; raises SHUTTING_DOWN (503) once the appliance stops."""
        if not self.accepting():
            raise PipelineError(ErrorCode.SHUTTING_DOWN, "server shutting down", retry_after=5)
        req = InferenceRequest(path=path, body=b"", method=method, request_id=request_id,
                               client=client, correlation_id=correlation_id, key=key)
        ticket = Ticket(req, float("inf"))
        ticket.endpoint = Operation(path)
        ticket.model = canonical(model) if model else None
        ticket.model_raw = model
        ticket.stream = stream
        self.ledger.admit()
        call = ManagementCall(self, operation, ticket)
        self.calls = {c for c in self.calls if not c.done}
        self.calls.add(call)
        return call
