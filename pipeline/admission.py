"""Admission: the six stage handlers that carry a request through the ring.

    validate -> select -> capacity -> dispatch -> metrics -> complete

Each handler reads and writes one ring slot and never yields. A request that finds no free
node slot is handed to the scheduler (it waits outside the ring); one that can go is handed to
the dispatcher; one that fails any stage is answered by ``complete`` with the first error.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from pipeline.config import Config
from pipeline.dispatch import Dispatcher
from pipeline.endpoints import endpoint_for, not_found_message
from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.ledger import Ledger
from pipeline.metrics import MetricsRegistry
from pipeline.modelname import canonical
from pipeline.registry import NodeRegistry
from pipeline.routing import Router
from pipeline.scheduler import Scheduler
from pipeline.slot import Slot
from pipeline.validation import BadRequest, inspect

log = logging.getLogger("ollama_lb.pipeline")


class Admission:
    """The stage handlers, in ring order, with what they consult."""

    def __init__(self, settings: Callable[[], Config], registry: NodeRegistry, router: Router,
                 scheduler: Scheduler, dispatcher: Dispatcher, ledger: Ledger,
                 metrics: MetricsRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.router = router
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.ledger = ledger
        self.metrics = metrics
        self.allowed: set[str] = set()
        self.configure(settings())

    def configure(self, config: Config) -> None:
        self.allowed = {canonical(m) for m in config.validation.allowedModels}

    def handlers(self) -> list[tuple[str, Callable[[Slot], None]]]:
        """(name, handler) in ring order, for the wiring."""
        return [("validate", self.validate), ("select", self.select),
                ("capacity", self.capacity), ("dispatch", self.dispatch),
                ("metrics", self.metrics_stage), ("complete", self.complete)]

    def stage_error(self, slot: Slot, stage: str, exc: Exception) -> None:
        log.exception("stage %s failed on a request", stage, exc_info=exc)
        if slot.error is None:
            slot.error = PipelineError(ErrorCode.INTERNAL, f"internal error in {stage}: {exc}")
        if slot.lease is not None and not slot.queued and stage in ("capacity", "dispatch"):
            # a lease taken in this stage must not leak; dispatch never started
            self.registry.release(slot.lease)
            slot.lease = None

    def validate(self, slot: Slot) -> None:
        if slot.error is not None:
            return
        req, ticket = slot.request, slot.ticket
        assert req is not None and ticket is not None
        ep = endpoint_for(req.path)
        if ep is None:
            slot.error = PipelineError(ErrorCode.INVALID_REQUEST, f"unsupported path {req.path}")
            return
        slot.endpoint = ticket.endpoint = ep
        if req.model is not None:
            raw, stream = req.model, False
        else:
            try:
                facts = req.facts or inspect(ep, req.body)
            except BadRequest as exc:
                slot.error = PipelineError(ErrorCode.INVALID_REQUEST, str(exc))
                return
            raw, stream, slot.fanout = facts.model_raw, facts.stream, facts.unload
            limit = self.settings().validation.maxPromptLength
            if facts.prompt_chars > limit:
                slot.error = PipelineError(ErrorCode.VALIDATION, f"prompt is too long: "
                                           f"{facts.prompt_chars} characters, the limit is "
                                           f"{limit}")
                return
        if not raw:
            slot.error = (PipelineError(ErrorCode.MODEL_NOT_FOUND, "model '' not found")
                          if ep.missing_model_404 else
                          PipelineError(ErrorCode.MODEL_REQUIRED, "model is required"))
            return
        model = canonical(raw)
        if self.allowed and model not in self.allowed:
            slot.error = PipelineError(ErrorCode.VALIDATION, f"model '{raw}' is not allowed")
            return
        slot.model_raw = ticket.model_raw = raw
        slot.model = ticket.model = model
        slot.stream = ticket.stream = stream

    def select(self, slot: Slot) -> None:
        if slot.error is not None:
            return
        admitting, has_it = self.router.classify(slot.model)
        if not has_it:
            assert slot.endpoint is not None
            if self.registry.all_nodes():
                slot.error = PipelineError(ErrorCode.MODEL_NOT_FOUND,
                                           not_found_message(slot.endpoint, slot.model_raw))
            else:
                slot.error = PipelineError(ErrorCode.NO_AVAILABLE_NODE,
                                           "no nodes are configured", retry_after=5.0)
            return
        if not admitting:
            slot.error = PipelineError(
                ErrorCode.NO_AVAILABLE_NODE,
                f"no node available for model '{slot.model_raw}': all are down or disabled",
                retry_after=self.scheduler.retry_hint())
            return
        slot.node = self.router.choose(slot.model, admitting)

    def capacity(self, slot: Slot) -> None:
        if slot.error is not None or slot.fanout:
            return
        assert slot.ticket is not None
        if slot.ticket.done():  # the caller left while the request was in the ring
            slot.error = PipelineError(ErrorCode.CANCELLED, "the caller went away")
            return
        node = slot.node
        slot.lease = node.try_acquire() if node is not None else None
        if slot.lease is None:
            slot.lease = self.router.acquire(slot.model)
        if slot.lease is not None:
            return
        try:
            self.scheduler.wait(slot.ticket, slot.model)
        except BackpressureError as exc:
            exc.retry_after = self.scheduler.retry_hint()
            slot.error = exc
            return
        slot.queued = True

    def dispatch(self, slot: Slot) -> None:
        if slot.error is not None or slot.queued:
            return
        assert slot.ticket is not None
        if slot.ticket.done():  # the caller left while the request was in the ring
            if slot.lease is not None:
                self.registry.release(slot.lease)
                slot.lease = None
            slot.error = PipelineError(ErrorCode.CANCELLED, "the caller went away")
            return
        if slot.fanout:
            self.dispatcher.fan_out(slot.ticket)
            slot.handed_off = True
        elif slot.lease is not None:
            self.dispatcher.start(slot.ticket, slot.lease)
            slot.handed_off = True

    def metrics_stage(self, slot: Slot) -> None:
        if slot.error is not None:
            outcome = "rejected"
        elif slot.fanout:
            outcome = "fanout"
        elif slot.queued:
            outcome = "queued"
        else:
            outcome = "dispatched"
        self.metrics.admissions(outcome).inc()

    def complete(self, slot: Slot) -> None:
        if slot.error is not None and slot.ticket is not None:
            self.ledger.finish(slot.ticket, slot.error.code.value, error=slot.error)
        slot.reset()
