"""The ledger: where a request's bookkeeping ends, exactly once.

Admission counts a request in (``admit``); whichever part of the pipeline answers it last
calls ``finish``, which counts it out, records its metrics and runs the finish hooks (the
access log). Metrics labels are bounded here: a model no node is known to have is ``other``.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable

from pipeline.endpoints import NATIVE
from pipeline.errors import PipelineError
from pipeline.metrics import OTHER, MetricsRegistry
from pipeline.modelname import display
from pipeline.registry import NodeRegistry
from pipeline.request import Ticket
from pipeline.tokens import counts_in

log = logging.getLogger("ollama_lb.pipeline")
_EVAL_DURATION = re.compile(rb'"eval_duration":\s*(\d+)')


class Ledger:
    """Requests admitted and not yet finished, and what each one's end records."""

    def __init__(self, registry: NodeRegistry, metrics: MetricsRegistry) -> None:
        self.registry = registry
        self.metrics = metrics
        self.in_flight = 0  # admitted by submit, not yet finished
        self.finish_hooks: list[Callable[[Ticket], None]] = []

    def admit(self) -> None:
        self.in_flight += 1

    def finish(self, ticket: Ticket, status: str, error: PipelineError | None = None) -> None:
        """End a request's bookkeeping exactly once: counters, metrics, hooks."""
        if ticket.finished:
            return
        ticket.finished = True
        ticket.status = status
        self.in_flight -= 1
        if error is not None:
            ticket.fail(error)
            self.metrics.errors(error.code.value).inc()
        ep = ticket.endpoint.path if ticket.endpoint is not None else "unknown"
        model = self.model_label(ticket.model)
        node = ticket.node_id or "none"
        now = time.monotonic()
        self.metrics.requests(ep, model, node, status).inc()
        self.metrics.latency(ep, model).observe(now - ticket.submitted_at)
        if ticket.first_byte_at is not None and ticket.node_id is not None:
            self.metrics.ttft(model, node).observe(ticket.first_byte_at - ticket.submitted_at)
        if ticket.tokens is not None:
            self.metrics.tokens(model, node).inc(ticket.tokens)
            if ticket.eval_ns:
                rate = ticket.tokens / (ticket.eval_ns / 1e9)
                self.metrics.token_rate(model, node).observe(rate)
        for hook in self.finish_hooks:
            try:
                hook(ticket)
            except Exception:
                log.exception("finish hook failed")

    def model_label(self, model: str | None) -> str:
        """A bounded label: the model's display name if any node is known to have it."""
        if not model:
            return OTHER
        for node in self.registry.all_nodes():
            if model in node.static_models or (node.installed and model in node.installed):
                return display(model)
        return OTHER

    def observe_body(self, ticket: Ticket, data: bytes) -> None:
        """Token counts and Ollama's generation time from a final chunk or a complete reply,
        read once onto the ticket: ``finish`` records them, and they are what the request is
        charged (``app/fastlane.py``).

        Not a JSON parse for a few integers: the counts are searched where they can be, and
        ``eval_duration`` (native replies only) in the tail, where it follows them.
        """
        ticket.tokens_in, ticket.tokens = counts_in(data)
        if ticket.tokens is not None and (ticket.endpoint is None
                                          or ticket.endpoint.api == NATIVE):
            duration = _EVAL_DURATION.search(data[-512:])
            ticket.eval_ns = int(duration.group(1)) if duration is not None else None
