"""The pipeline: a ring of slots and six stage greenlets, composed from its parts.

    submit -> [validate] -> [select] -> [capacity] -> [dispatch] -> [metrics] -> [complete]

``submit`` (the producer) claims a ring slot, fills it and publishes it without yielding, or
fails at once with a backpressure error. The parts, each in a module of its own:

- ``Admission``: the stage handlers (what happens to a request in the ring);
- ``Router``: which node a request may go to; ``Scheduler``: requests waiting for capacity;
- ``Dispatcher``: the node calls, with the ``RetryPolicy`` and the ``StreamRelay``;
- ``Ledger``: the single place a request's bookkeeping ends.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from pipeline.admission import Admission
from pipeline.breaker import CircuitState
from pipeline.config import Config
from pipeline.dispatch import Dispatcher
from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.fanout import FanOut
from pipeline.ledger import Ledger
from pipeline.metrics import MetricsRegistry
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.request import InferenceRequest, InferenceResponse, StreamHandle, Ticket
from pipeline.retry import RetryPolicy
from pipeline.ring import RingBuffer
from pipeline.routing import Router
from pipeline.scheduler import Scheduler
from pipeline.slot import Slot
from pipeline.stage import Stage
from pipeline.strategy import Strategy, StrategyFactory
from pipeline.unload import Unload
from pipeline.upstream import UpstreamClient
from pipeline.wait import create_wait_strategy
from pipeline.wiring import Disruptor

log = logging.getLogger("ollama_lb.pipeline")


class Pipeline:
    def __init__(self, config: Config, registry: NodeRegistry, metrics: MetricsRegistry,
                 upstream: UpstreamClient | None = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.upstream = upstream or UpstreamClient()
        d = config.disruptor
        self.ledger = Ledger(registry, metrics)
        self.router = Router(registry, StrategyFactory.create(config.strategy.type,
                                                              config.strategy.adaptive),
                             waiting=lambda model: self.scheduler.queue.waiting(model),
                             max_warm_wait_s=config.strategy.maxWarmWaitMs / 1000.0)
        self.scheduler = Scheduler(self.router, self.ledger, metrics, d.queueSize,
                                   d.queueTimeoutMs / 1000.0)
        self.fan_out = FanOut(registry, self.upstream, self._fan_out_timeouts,
                              refresh=lambda node: None)
        self.dispatcher = Dispatcher(lambda: self.config, registry, self.router, self.ledger,
                                     metrics, self.upstream,
                                     RetryPolicy(lambda: self.config.retry, self.router),
                                     Unload(self.fan_out, self.ledger))
        self.dispatcher.requeue = self.scheduler.requeue
        self.scheduler.dispatch = self.dispatcher.start
        self.admission = Admission(lambda: self.config, registry, self.router, self.scheduler,
                                   self.dispatcher, self.ledger, metrics)
        self.wait_strategy = create_wait_strategy(d.waitStrategy)
        self.ring: RingBuffer[Slot] = RingBuffer(d.ringBufferSize, Slot, self.wait_strategy)
        self.running = False
        self.accepting = False
        self.crashed: str | None = None
        disruptor: Disruptor[Slot] = Disruptor(self.ring, self.admission.stage_error)
        first, *rest = self.admission.handlers()
        disruptor.handle_events_with(first)
        for handler in rest:
            disruptor.then(handler)
        self.disruptor = disruptor
        registry.on_capacity = self.scheduler.wake
        registry.on_circuit_change = self._circuit_changed
        metrics.bind(self.stats, self._all_nodes)

    # --- what callers and operators read -----------------------------------------------------

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished."""
        return self.ledger.in_flight

    @property
    def queue(self) -> Any:
        """The capacity queue (requests waiting for a node slot)."""
        return self.scheduler.queue

    @property
    def finish_hooks(self) -> list[Callable[[Ticket], None]]:
        return self.ledger.finish_hooks

    @property
    def streams(self) -> set[Any]:
        return self.dispatcher.streams

    def finish(self, ticket: Ticket, status: str, error: PipelineError | None = None) -> None:
        self.ledger.finish(ticket, status, error)

    def offer_capacity(self) -> None:
        """Re-check waiters after a change that may free capacity (health, config)."""
        self.scheduler.wake()

    def _all_nodes(self) -> list[Node]:
        """Every node with state to show: configured ones, and draining ones by another id."""
        current = self.registry.all_nodes()
        ids = {n.id for n in current}
        return current + [n for n in self.registry.removed_nodes() if n.id not in ids]

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> Pipeline:
        if not self.running:
            self.disruptor.start(self._stage_crashed)
            self.running = True
            self.accepting = True
        return self

    def stop_accepting(self) -> None:
        self.accepting = False

    def stop(self) -> None:
        """Stop the stages; requests still waiting for capacity are answered, not dropped."""
        self.accepting = False
        self.scheduler.drain()
        self.disruptor.halt()
        self.running = False

    def cut_streams(self, reason: str) -> int:
        """End every live stream with one error line (shutdown past the drain bound)."""
        streams = list(self.streams)
        for relay in streams:
            relay.cut(reason)
        return len(streams)

    @property
    def stages(self) -> list[Stage[Slot]]:
        return self.disruptor.stages

    def _circuit_changed(self, node: Node, old: CircuitState, new: CircuitState) -> None:
        self.metrics.circuit_transitions(node.id, new.value).inc()
        log.warning("circuit state changed", extra={
            "event": "circuit", "node": node.id, "from": old.value, "to": new.value,
            "error": node.last_error})
        if new is not CircuitState.OPEN:
            self.offer_capacity()  # a trial may now go through: waiting requests can use it

    def _fan_out_timeouts(self) -> tuple[float, float]:
        t = self.config.timeouts
        return t.connectTimeoutMs / 1000.0, t.requestTimeoutMs / 1000.0

    def _stage_crashed(self, stage: Stage[Slot], exc: BaseException) -> None:
        self.crashed = f"stage {stage.name} crashed: {exc!r}"
        self.accepting = False
        log.critical("pipeline stage crashed", extra={"event": "stage_crashed",
                                                      "stage": stage.name, "error": repr(exc)})
        self._fail_stranded(stage)

    def _fail_stranded(self, crashed: Stage[Slot]) -> None:
        """Answer at once every request the dead stage would have carried on.

        Slots past the crashed stage's sequence will never move again. Those already handed
        to the scheduler (queued) or the dispatcher are answered there; every other one is
        failed now with the crash as its error, and any lease it holds is given back.
        """
        error = PipelineError(ErrorCode.INTERNAL, self.crashed or "a pipeline stage crashed")
        for seq in range(crashed.sequence.value + 1, self.ring.cursor.value + 1):
            slot = self.ring.get(seq)
            ticket = slot.ticket
            if ticket is None or slot.queued or slot.handed_off or ticket.finished:
                continue
            if slot.lease is not None:
                self.registry.release(slot.lease)
                slot.lease = None
            self.ledger.finish(ticket, error.code.value, error=slot.error or error)

    # --- the producer -------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> Ticket:
        """Enqueue a request; never blocks. Raises PipelineError when it cannot be taken."""
        if not self.accepting:
            if self.crashed:
                raise PipelineError(ErrorCode.INTERNAL, self.crashed)
            raise PipelineError(ErrorCode.SHUTTING_DOWN, "server shutting down", retry_after=5)
        if self.ledger.in_flight >= self.config.disruptor.maxGlobalInFlight:
            self._rejected("in_flight_full")
            raise BackpressureError(
                "server busy, please try again.  maximum requests in flight exceeded")
        try:
            seq = self.ring.try_claim()
        except BackpressureError:
            self._rejected("ring_full")
            raise
        timeout = request.timeout_s or self.config.timeouts.requestTimeoutMs / 1000.0
        ticket = Ticket(request, time.monotonic() + timeout)
        self.ledger.admit()
        slot = self.ring.get(seq)
        try:
            slot.request = request
            slot.ticket = ticket
        finally:  # a claimed slot is always published
            self.ring.publish(seq)
        return ticket

    def _rejected(self, outcome: str) -> None:
        self.metrics.admissions(outcome).inc()
        self.metrics.errors(ErrorCode.BACKPRESSURE.value).inc()

    def call(self, request: InferenceRequest) -> InferenceResponse | StreamHandle:
        """Submit and wait; raises the PipelineError if the request failed."""
        return self.submit(request).result()

    def stream(self, request: InferenceRequest) -> StreamHandle:
        """Submit a streaming request and return its handle (use it as a context manager)."""
        result = self.call(request)
        if not isinstance(result, StreamHandle):
            raise PipelineError(ErrorCode.UPSTREAM,
                                f"expected a stream, got HTTP {result.status}: "
                                f"{result.body[:200]!r}")
        return result

    # --- runtime changes and introspection ----------------------------------------------------

    def set_strategy(self, strategy: Strategy | str) -> None:
        """Swap the routing strategy; requests in flight are unaffected."""
        if isinstance(strategy, str):
            strategy = StrategyFactory.create(strategy, self.config.strategy.adaptive)
        self.router.strategy = strategy

    @property
    def strategy(self) -> Strategy:
        return self.router.strategy

    def apply_config(self, config: Config) -> None:
        """Take a reloaded config: new requests see the new settings at once."""
        self.config = config
        self.admission.configure(config)
        self.router.max_warm_wait_s = config.strategy.maxWarmWaitMs / 1000.0
        d = config.disruptor
        self.scheduler.configure(d.queueSize, d.queueTimeoutMs / 1000.0)
        if (config.strategy.type != self.router.strategy.name
                or config.strategy.adaptive != self.router.strategy.adaptive):
            self.set_strategy(StrategyFactory.create(config.strategy.type,
                                                     config.strategy.adaptive))
        self.offer_capacity()

    def stats(self) -> dict[str, Any]:
        return {
            "globalInFlight": self.ledger.in_flight,
            "maxGlobalInFlight": self.config.disruptor.maxGlobalInFlight,
            "ringBufferSize": self.ring.size,
            "ringBufferRemaining": self.ring.remaining(),
            "queued": len(self.queue),
            "queuedByModel": self.queue.by_model(),
            "strategy": self.router.strategy.name,
            "waitStrategy": self.wait_strategy.name,
            "running": self.running and self.crashed is None,
            "crashed": self.crashed,
            "stages": {s.name: {"sequence": s.sequence.value, "batches": s.batches,
                                "alive": s.greenlet is not None and not s.greenlet.dead}
                       for s in self.stages},
        }
