"""Unload: a generate/chat with nothing to generate and ``keep_alive: 0`` reaches every node.

A client unloading a model through the appliance means "free it on the pool", so the request
goes to every serving node that has the model and is answered once, with the best reply.
"""

from __future__ import annotations

import time

from pipeline.errors import ErrorCode, PipelineError
from pipeline.fanout import FanOut
from pipeline.ledger import Ledger
from pipeline.request import InferenceResponse, Ticket


class Unload:
    def __init__(self, fan_out: FanOut, ledger: Ledger) -> None:
        self.fan_out = fan_out
        self.ledger = ledger

    def run(self, ticket: Ticket) -> None:
        """Send the unload to every node with the model; answer the caller once."""
        model = ticket.model or ""
        req = ticket.request
        nodes = self.fan_out.having(model)
        replies = self.fan_out.send_all(req.method, req.path, req.body, nodes, refresh=False,
                                        timeout=max(0.001, ticket.deadline - time.monotonic()))
        answered = [r for r in replies if r.status]
        for r in answered:
            if r.status == 200:
                r.node.loaded.discard(model)
        ticket.attempts = len(nodes)
        ok = [r for r in answered if r.status == 200]
        best = ok[0] if ok else (answered[0] if answered else None)
        if best is None:
            err = PipelineError(ErrorCode.NO_AVAILABLE_NODE,
                                f"no node could unload model '{ticket.model_raw}'",
                                retry_after=1.0)
            self.ledger.finish(ticket, err.code.value, error=err)
            return
        ticket.node_id = best.node.id if len(nodes) == 1 else "all"
        ticket.set(InferenceResponse(best.status, best.content_type, best.body, ticket.node_id,
                                     len(nodes)))
        self.ledger.finish(ticket, str(best.status))
