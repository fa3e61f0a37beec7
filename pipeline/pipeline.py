"""The pipeline: a ring of slots and six stage greenlets, and everything they share.

    submit -> [validate] -> [select] -> [capacity] -> [dispatch] -> [metrics] -> [complete]

``submit`` claims a slot, fills it and publishes it without yielding, or fails at once with a
backpressure error. Stages batch whatever is available per wake-up. Requests that find no free
node slot wait in the capacity queue, outside the ring; the LLM call itself runs in a dispatch
greenlet. ``finish`` is the single place a request's bookkeeping ends.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterable
from typing import Any

from gevent.pool import Pool

from pipeline.breaker import CircuitState
from pipeline.config import Config
from pipeline.dispatch import Dispatcher
from pipeline.endpoints import endpoint_for, not_found_message
from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.fanout import FanOut
from pipeline.metrics import OTHER, MetricsRegistry
from pipeline.modelname import canonical, display
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.request import InferenceRequest, InferenceResponse, StreamHandle, Ticket
from pipeline.ring import RingBuffer
from pipeline.slot import Slot
from pipeline.stage import Stage
from pipeline.strategy import Strategy, StrategyFactory
from pipeline.upstream import UpstreamClient
from pipeline.validation import BadRequest, is_unload, parse_body, prompt_length, read_facts
from pipeline.wait import create_wait_strategy
from pipeline.waitqueue import CapacityQueue, Waiter
from pipeline.wiring import Disruptor

log = logging.getLogger("ollama_lb.pipeline")
#: model-aware waits for busy warm nodes until this many rounds of their slots are queued
WARM_BACKLOG = 2
_EVAL_COUNT = re.compile(rb'"eval_count":\s*(\d+)')
_EVAL_DURATION = re.compile(rb'"eval_duration":\s*(\d+)')


class Router:
    """Which nodes can take a model now, and which one the strategy picks.

    With a strategy that ``waits_for_warm`` (model-aware), a request whose model is loaded on
    nodes that are all busy waits for one of them rather than forcing a cold load (seconds,
    and an eviction) elsewhere, until the backlog for that model reaches ``WARM_BACKLOG``
    rounds of the warm nodes' slots: then it spreads to spare nodes (empty, or holding only
    models that are warm elsewhere too), so a popular model scales out without evicting the
    last warm copy of another model, which would only move the cold load to that model.
    """

    def __init__(self, registry: NodeRegistry, strategy: Strategy,
                 waiting: Callable[[str], int] = lambda model: 0) -> None:
        self.registry = registry
        self.strategy = strategy
        self.waiting = waiting  # requests queued for a model

    @property
    def strategy(self) -> Strategy:
        return self._strategy

    @strategy.setter
    def strategy(self, strategy: Strategy) -> None:
        strategy.pool = self.registry.all_nodes
        self._strategy = strategy

    def classify(self, model: str) -> tuple[list[Node], bool]:
        """(nodes that admit requests and have the model, whether any node has it at all)."""
        admitting: list[Node] = []
        has_it = False
        for node in self.registry.all_nodes():
            if node.enabled and node.has_model(model):
                has_it = True
                if node.admits():
                    admitting.append(node)
        return admitting, has_it

    def free(self, model: str, admitting: list[Node]) -> list[Node]:
        """The nodes the strategy may pick from now (see the class docstring)."""
        free = [n for n in admitting if n.has_capacity()]
        if not free or not self.strategy.waits_for_warm:
            return free
        warm = [n for n in admitting if model in n.loaded]
        if not warm or any(n.has_capacity() for n in warm):
            return free  # nothing warm anywhere (a cold load is unavoidable), or warm and free
        if self.waiting(model) < WARM_BACKLOG * sum(n.max_concurrent for n in warm):
            return []  # wait for a warm slot
        return [n for n in free if self._spare(n)]  # scale out without evicting a last copy

    def _spare(self, node: Node) -> bool:
        """Empty, or every model loaded on it is also loaded on another node."""
        others = [n for n in self.registry.all_nodes() if n is not node]
        return all(any(m in o.loaded for o in others) for m in node.loaded)

    def choose(self, model: str, admitting: list[Node]) -> Node | None:
        free = self.free(model, admitting)
        return self.strategy.select(free, model) if free else None

    def acquire(self, model: str, exclude: Iterable[Node] = ()) -> Node | None:
        """Pick and take a slot on a node for ``model``, or None if none has room."""
        skip = {n.id for n in exclude}
        admitting, _ = self.classify(model)
        candidates = [n for n in self.free(model, admitting) if n.id not in skip]
        while candidates:
            node = self.strategy.select(candidates, model)
            if node is None:
                return None
            if node.try_acquire():
                return node
            candidates.remove(node)
        return None


class Pipeline:
    def __init__(self, config: Config, registry: NodeRegistry, metrics: MetricsRegistry,
                 upstream: UpstreamClient | None = None) -> None:
        self.config = config
        self.registry = registry
        self.metrics = metrics
        self.upstream = upstream or UpstreamClient()
        self.router = Router(registry, StrategyFactory.create(config.strategy.type,
                                                              config.strategy.adaptive),
                             waiting=lambda model: self.queue.waiting(model))
        d = config.disruptor
        self.wait_strategy = create_wait_strategy(d.waitStrategy)
        self.ring: RingBuffer[Slot] = RingBuffer(d.ringBufferSize, Slot, self.wait_strategy)
        self.queue = CapacityQueue(d.queueSize, d.queueTimeoutMs / 1000.0, self._queue_expired)
        self.pool = Pool(d.maxGlobalInFlight)
        self.dispatcher = Dispatcher(self)
        self.fan_out = FanOut(registry, self.upstream, self._fan_out_timeouts,
                              refresh=lambda node: None)
        self.in_flight = 0  # admitted by submit, not yet finished
        self.running = False
        self.accepting = False
        self.crashed: str | None = None
        self.finish_hooks: list[Callable[[Ticket], None]] = []
        self.streams: set[Any] = set()  # StreamRelays handed to callers and not yet closed
        self._draining_queue = False
        self._allowed = {canonical(m) for m in config.validation.allowedModels}
        self.disruptor: Disruptor[Slot] = (
            Disruptor(self.ring, self._stage_error)
            .handle_events_with(("validate", self._validate))
            .then(("select", self._select))
            .then(("capacity", self._capacity))
            .then(("dispatch", self._dispatch))
            .then(("metrics", self._metrics))
            .then(("complete", self._complete))
        )
        registry.on_capacity = self._on_capacity
        registry.on_circuit_change = self._circuit_changed
        metrics.bind(self)

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
        for waiter in self.queue.drain_all():
            self.finish(waiter.ticket, ErrorCode.SHUTTING_DOWN.value, error=PipelineError(
                ErrorCode.SHUTTING_DOWN, "server shutting down", retry_after=5.0))
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
            self.poke()  # a trial may now go through: waiting requests can use it

    def _fan_out_timeouts(self) -> tuple[float, float]:
        t = self.config.timeouts
        return t.connectTimeoutMs / 1000.0, t.requestTimeoutMs / 1000.0

    def _stage_crashed(self, stage: Stage[Slot], exc: BaseException) -> None:
        self.crashed = f"stage {stage.name} crashed: {exc!r}"
        self.accepting = False
        log.critical("pipeline stage crashed", extra={"event": "stage_crashed",
                                                      "stage": stage.name, "error": repr(exc)})

    # --- the producer -------------------------------------------------------------------------

    def submit(self, request: InferenceRequest) -> Ticket:
        """Enqueue a request; never blocks. Raises PipelineError when it cannot be taken."""
        if not self.accepting:
            if self.crashed:
                raise PipelineError(ErrorCode.INTERNAL, self.crashed)
            raise PipelineError(ErrorCode.SHUTTING_DOWN, "server shutting down", retry_after=5)
        if self.in_flight >= self.config.disruptor.maxGlobalInFlight:
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
        self.in_flight += 1
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

    # --- stages -------------------------------------------------------------------------------

    def _stage_error(self, slot: Slot, stage: str, exc: Exception) -> None:
        log.exception("stage %s failed on a request", stage, exc_info=exc)
        if slot.error is None:
            slot.error = PipelineError(ErrorCode.INTERNAL, f"internal error in {stage}: {exc}")
        if slot.node is not None and not slot.queued and stage in ("capacity", "dispatch"):
            # a slot taken in this stage must not leak; dispatch never started
            self.registry.release(slot.node)
            slot.node = None

    def _validate(self, slot: Slot) -> None:
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
                payload = parse_body(ep, req.body)
                facts = read_facts(ep, payload)
            except BadRequest as exc:
                slot.error = PipelineError(ErrorCode.INVALID_REQUEST, str(exc))
                return
            raw = facts.get("model") or (facts.get("name") if ep.name_fallback else None) or ""
            stream = bool(facts.get("stream", ep.stream_default)
                          if facts.get("stream") is not None else ep.stream_default)
            stream = stream and ep.can_stream
            slot.fanout = ep.unloads and is_unload(payload)
            limit = self.config.validation.maxPromptLength
            if raw and (n := prompt_length(payload)) > limit:
                slot.error = PipelineError(ErrorCode.VALIDATION, f"prompt is too long: {n} "
                                           f"characters, the limit is {limit}")
                return
        if not raw:
            slot.error = (PipelineError(ErrorCode.MODEL_NOT_FOUND, "model '' not found")
                          if ep.missing_model_404 else
                          PipelineError(ErrorCode.MODEL_REQUIRED, "model is required"))
            return
        model = canonical(raw)
        if self._allowed and model not in self._allowed:
            slot.error = PipelineError(ErrorCode.VALIDATION, f"model '{raw}' is not allowed")
            return
        slot.model_raw = ticket.model_raw = raw
        slot.model = ticket.model = model
        slot.stream = ticket.stream = stream

    def _select(self, slot: Slot) -> None:
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
                retry_after=self._retry_hint())
            return
        slot.node = self.router.choose(slot.model, admitting)

    def _capacity(self, slot: Slot) -> None:
        if slot.error is not None or slot.fanout:
            return
        node = slot.node
        if node is not None and node.try_acquire():
            return
        slot.node = self.router.acquire(slot.model)
        if slot.node is not None:
            return
        ticket = slot.ticket
        assert ticket is not None
        try:
            waiter = self.queue.put(ticket, slot.model, ticket.deadline - time.monotonic())
        except BackpressureError as exc:
            exc.retry_after = self._retry_hint()
            slot.error = exc
            return
        slot.queued = True
        ticket.on_cancel = lambda: self._cancel_waiter(waiter)

    def _dispatch(self, slot: Slot) -> None:
        if slot.error is not None or slot.queued:
            return
        assert slot.ticket is not None
        if slot.fanout:
            self.dispatcher.fan_out(slot.ticket)
        elif slot.node is not None:
            self.dispatcher.start(slot.ticket, slot.node)

    def _metrics(self, slot: Slot) -> None:
        if slot.error is not None:
            outcome = "rejected"
        elif slot.fanout:
            outcome = "fanout"
        elif slot.queued:
            outcome = "queued"
        else:
            outcome = "dispatched"
        self.metrics.admissions(outcome).inc()

    def _complete(self, slot: Slot) -> None:
        if slot.error is not None and slot.ticket is not None:
            self.finish(slot.ticket, slot.error.code.value, error=slot.error)
        slot.reset()

    # --- the capacity queue -------------------------------------------------------------------

    def _on_capacity(self, node: Node) -> None:
        """A node slot was freed (or a node came back): hand it to the oldest waiter."""
        if not self.queue or self._draining_queue:
            return
        self._draining_queue = True
        try:
            progress = True
            while progress and self.queue:
                progress = False
                for waiter in self.queue.heads():
                    got = self.router.acquire(waiter.model)
                    if got is None:
                        continue
                    self.queue.pop(waiter)
                    waiter.ticket.queue_wait = time.monotonic() - waiter.ticket.submitted_at
                    self.metrics.queue_wait.observe(waiter.ticket.queue_wait)
                    self.dispatcher.start(waiter.ticket, got)
                    progress = True
                    break
        finally:
            self._draining_queue = False

    def poke(self) -> None:
        """Re-check waiters after a change that may free capacity (health, config)."""
        self._on_capacity(None)  # type: ignore[arg-type]

    def _queue_expired(self, waiter: Waiter) -> None:
        self.metrics.queue_wait.observe(time.monotonic() - waiter.ticket.submitted_at)
        timed_out = time.monotonic() >= waiter.ticket.deadline
        err = (PipelineError(ErrorCode.TIMEOUT, "request timed out waiting for a node")
               if timed_out else BackpressureError(
                   "server busy, please try again.  timed out waiting for a free node",
                   self._retry_hint()))
        self.finish(waiter.ticket, err.code.value, error=err)

    def requeue(self, ticket: Ticket) -> bool:
        """A retry found no free node: wait in the capacity queue (False if it is full)."""
        try:
            waiter = self.queue.put(ticket, ticket.model or "",
                                    ticket.deadline - time.monotonic())
        except BackpressureError:
            return False
        ticket.on_cancel = lambda: self._cancel_waiter(waiter)
        self.metrics.retry("queued")
        self.poke()
        return True

    def _cancel_waiter(self, waiter: Waiter) -> None:
        if self.queue.remove(waiter):
            self.finish(waiter.ticket, "CANCELLED")

    def _retry_hint(self) -> float:
        """Seconds a shed client should wait: about how long the oldest waiter has waited."""
        return float(max(1, min(30, round(self.queue.oldest_wait(time.monotonic())) or 1)))

    # --- bookkeeping --------------------------------------------------------------------------

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
        """Token counts and speed from a final chunk or a complete generate/chat reply.

        Ollama puts ``eval_count``/``eval_duration`` at the end of its final object, so only
        the tail is searched; parsing a whole reply as JSON just for two integers cost
        ~80 us per request.
        """
        tail = data[-512:]
        count = _EVAL_COUNT.search(tail)
        if count is None:
            return
        duration = _EVAL_DURATION.search(tail)
        tokens = int(count.group(1))
        model, node = self.model_label(ticket.model), ticket.node_id or "none"
        ticket.tokens = tokens
        self.metrics.tokens(model, node).inc(tokens)
        if duration is not None and int(duration.group(1)) > 0:
            self.metrics.token_rate(model, node).observe(
                tokens / (int(duration.group(1)) / 1e9))

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
        self._allowed = {canonical(m) for m in config.validation.allowedModels}
        d = config.disruptor
        self.queue.limit = d.queueSize
        self.queue.timeout_s = d.queueTimeoutMs / 1000.0
        self.pool.size = d.maxGlobalInFlight
        if (config.strategy.type != self.router.strategy.name
                or config.strategy.adaptive != self.router.strategy.adaptive):
            self.set_strategy(StrategyFactory.create(config.strategy.type,
                                                     config.strategy.adaptive))
        self.poke()

    def stats(self) -> dict[str, Any]:
        return {
            "globalInFlight": self.in_flight,
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
