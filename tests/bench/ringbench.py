"""The ring measured against two baselines that run the very same six stage functions.

- ``ring``: ``Pipeline.submit`` through the Disruptor (six stage greenlets, batching), and
  one request at a time (``run_serial``: no batching, every stage woken per request).
- ``loop``: the six handlers called one after the other in a plain loop (no concurrency).
- ``queues``: six greenlets chained by ``gevent.queue.Queue``, the obvious alternative.

Dispatch is a no-op that completes the request at once, so what is measured is the pipeline,
not HTTP. Shared by the pytest-benchmark tests and the report harness.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gevent
from gevent.queue import Queue

from pipeline import BackpressureError, InferenceRequest, PipelineFactory
from pipeline.config import parse_config
from pipeline.request import InferenceResponse, Ticket
from pipeline.slot import Slot

BODY = b'{"model": "m", "prompt": "Why is the sky blue?", "stream": false}'
DONE = InferenceResponse(200, "application/json", b"{}", "n0", 1)


def make_factory(wait_strategy: str = "yielding", ring: int = 1024) -> PipelineFactory:
    cfg = parse_config({
        "nodes": [{"id": "n0", "url": "http://127.0.0.1:9", "models": ["m"],
                   "maxConcurrentRequests": 1 << 20}],
        "disruptor": {"ringBufferSize": ring, "waitStrategy": wait_strategy,
                      "maxGlobalInFlight": 1 << 20, "queueSize": 1 << 20},
        "healthCheck": {"enabled": False, "discovery": False},
    })
    factory = PipelineFactory(cfg).start(health_checks=False)
    p = factory.pipeline
    done_at: dict[str, float] = {}  # request id -> when it was dispatched

    def no_op_dispatch(ticket: Ticket, node: object) -> None:
        p.registry.release(node)  # type: ignore[arg-type]
        ticket.set(DONE)
        p.finish(ticket, "200")
        done_at[ticket.request.request_id] = time.perf_counter()

    p.scheduler.dispatch = no_op_dispatch
    p.dispatcher.start = no_op_dispatch  # type: ignore[method-assign]
    factory.done_at = done_at  # type: ignore[attr-defined]
    return factory


def handlers(factory: PipelineFactory) -> list[Callable[[Slot], None]]:
    p = factory.pipeline
    return [handler for _, handler in p.admission.handlers()]


def request() -> InferenceRequest:
    return InferenceRequest(path="/api/generate", body=BODY)


def run_ring(factory: PipelineFactory, n: int) -> float:
    """Seconds to push n requests through the ring and see them all finish."""
    p = factory.pipeline
    t0 = time.perf_counter()
    for _ in range(n):
        while True:
            try:
                p.submit(request())
                break
            except BackpressureError:
                gevent.sleep(0)  # ring full: let the stages drain it
    while p.in_flight:
        gevent.sleep(0)
    return time.perf_counter() - t0


def run_serial(factory: PipelineFactory, n: int) -> float:
    """Seconds for n requests one at a time, each submitted once the one before is answered
    and waited for in ``Ticket.result()`` as a request handler does: every stage parks and
    is woken for every request, which is what an idle ring costs (no batching to hide it)."""
    p = factory.pipeline
    t0 = time.perf_counter()
    for _ in range(n):
        p.submit(request()).result()
    return time.perf_counter() - t0


def fill(slot: Slot, factory: PipelineFactory) -> Ticket:
    ticket = Ticket(request(), time.monotonic() + 60)
    factory.pipeline.ledger.admit()  # what submit counts, so finish balances it
    slot.request, slot.ticket = ticket.request, ticket
    return ticket


def run_loop(factory: PipelineFactory, n: int) -> float:
    steps = handlers(factory)
    slot = Slot()
    t0 = time.perf_counter()
    for _ in range(n):
        fill(slot, factory)
        for step in steps:
            step(slot)
    return time.perf_counter() - t0


def run_queues(factory: PipelineFactory, n: int) -> float:
    steps = handlers(factory)
    queues: list[Queue] = [Queue() for _ in range(len(steps) + 1)]

    def worker(step: Callable[[Slot], None], inbox: Queue, outbox: Queue) -> None:
        while True:
            slot = inbox.get()
            step(slot)
            outbox.put(slot)

    workers = [gevent.spawn(worker, s, queues[i], queues[i + 1]) for i, s in enumerate(steps)]
    t0 = time.perf_counter()
    for _ in range(n):
        slot = Slot()
        fill(slot, factory)
        queues[0].put(slot)
    for _ in range(n):
        queues[-1].get()
    elapsed = time.perf_counter() - t0
    gevent.killall(workers)
    return elapsed


def arrivals(rate: int, seconds: float, burst: bool) -> list[float]:
    """When each request is due, in seconds from the start.

    Paced (``burst=False``): one every ``1 / rate`` s, as requests read by independent
    handler greenlets arrive. Burst: all of a 1 ms tick's requests due at the tick's start,
    published without a yield between them, which measures the ring's batching instead.
    """
    if not burst:
        return [i / rate for i in range(int(rate * seconds))]
    per_tick = max(1, rate // 1000)
    return [tick / 1000 for tick in range(int(seconds * 1000)) for _ in range(per_tick)]


def _until(due: float) -> None:
    """Yield to the hub until ``due`` (``perf_counter``): timers have 1 ms resolution."""
    while time.perf_counter() < due:
        gevent.sleep(0)


def latency_ring(factory: PipelineFactory, rate: int = 10_000, seconds: float = 1.0,
                 burst: bool = False) -> list[float]:
    """Per-request seconds from when it was due to its dispatch, through the ring.

    Measured from the due time, not the submit, so a producer held up by the ring counts
    against it. Requests are told apart by their ids: no ticket is kept alive, so the
    collector has no more to walk than in the plain loop.
    """
    p = factory.pipeline
    done = factory.done_at  # type: ignore[attr-defined]
    done.clear()
    due = arrivals(rate, seconds, burst)
    start = time.perf_counter()
    for i, at in enumerate(due):
        _until(start + at)
        p.submit(InferenceRequest(path="/api/generate", body=BODY, request_id=str(i)))
    while p.in_flight:
        gevent.sleep(0.001)
    return [done[str(i)] - (start + at) for i, at in enumerate(due)]


def latency_loop(factory: PipelineFactory, rate: int = 10_000, seconds: float = 1.0,
                 burst: bool = False) -> list[float]:
    """The same arrivals through the six functions in a plain loop, each request taken
    when it is due or when the one before is done, whichever is later, and timed to its
    dispatch: the difference from ``latency_ring`` is what the ring itself adds."""
    steps = handlers(factory)
    slot = Slot()
    done = factory.done_at  # type: ignore[attr-defined]
    out = []
    start = time.perf_counter()
    for at in arrivals(rate, seconds, burst):
        _until(start + at)
        rid = fill(slot, factory).request.request_id
        for step in steps:
            step(slot)
        out.append(done.pop(rid) - (start + at))  # stamped at dispatch, as in the ring
    return out


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]
