"""Small costs the code's design rests on, re-measured on demand rather than quoted forever.

Docstrings say *why* a choice was made; the figures behind it age with every dependency
upgrade and machine, so they live in tests/bench/performance.md with their date and this
command. Each figure is the best of 5 repeats (the least disturbed by other work on a shared
machine), per operation:

- request validation: the marshmallow schema vs the fast path for well-typed bodies
- a Prometheus counter: ``.labels(...).inc()`` vs a cached child's ``.inc()``
- gevent: ``gevent.sleep(0)`` with nothing else to run; one wake-up hop between two
  greenlets through an Event (how ring stages parked until 2026-12-03), through a plain hub
  callback (how a publisher wakes the first stage now), and a direct switch (how a stage
  that parks hands on to the parked stage after it)
- one small POST to a simulated node (client CPU): ``HTTPAdapter.send`` with a hand-filled
  ``PreparedRequest`` vs the same adapter's urllib3 pool called directly

Usage: .venv/bin/python tests/bench/microcosts.py
"""
# ruff: noqa: E402, I001  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import sys
import time
import timeit
from collections.abc import Callable
from pathlib import Path

import gevent
from gevent.event import Event
from greenlet import getcurrent, greenlet
from prometheus_client import CollectorRegistry, Counter
from requests import PreparedRequest
from requests.adapters import HTTPAdapter

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))

import procs
from pipeline.endpoints import ENDPOINTS
from pipeline.validation import load_facts, read_facts


def best_us(fn: Callable[[], object], number: int) -> float:
    return min(timeit.repeat(fn, number=number, repeat=5)) / number * 1e6


def cpu_us(fn: Callable[[], object], number: int) -> float:
    """CPU (not wall) time per call, best of 5: what a call costs this process."""
    runs = []
    for _ in range(5):
        t0 = time.process_time()
        for _ in range(number):
            fn()
        runs.append(time.process_time() - t0)
    return min(runs) / number * 1e6


def validation() -> dict[str, float]:
    ep = ENDPOINTS["/v1/chat/completions"]
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": False}
    return {"validation schema (load_facts)": best_us(lambda: load_facts(ep, body), 20000),
            "validation fast path (read_facts)": best_us(lambda: read_facts(ep, body), 20000)}


def metrics() -> dict[str, float]:
    c = Counter("x_total", "x", ["endpoint", "model", "node", "status"],
                registry=CollectorRegistry())
    child = c.labels("/api/chat", "m", "n0", "200")
    return {"counter .labels(...).inc()": best_us(
                lambda: c.labels("/api/chat", "m", "n0", "200").inc(), 20000),
            "counter cached child .inc()": best_us(child.inc, 20000)}


def _volley(rounds: int, wait: Callable[[int], None], wake: Callable[[int], None]) -> float:
    """Microseconds per hop of a ball passed ``rounds`` times each way between two
    greenlets (side 0 serves, side 1 echoes)."""
    def echo() -> None:
        for _ in range(rounds):
            wait(1)
            wake(0)

    g = gevent.spawn(echo)
    gevent.sleep(0)  # the echo side is waiting before the first serve
    t0 = time.perf_counter()
    for _ in range(rounds):
        wake(1)
        wait(0)
    hop = (time.perf_counter() - t0) / (2 * rounds) * 1e6
    g.join()
    return hop


def hub() -> dict[str, float]:
    rounds = 20000
    events = (Event(), Event())

    def event_wait(side: int) -> None:
        events[side].wait()
        events[side].clear()

    hub_ = gevent.get_hub()
    sides: list[greenlet] = [getcurrent(), getcurrent()]

    def hub_wait(side: int) -> None:
        sides[side] = getcurrent()
        hub_.switch()

    def direct() -> float:
        """The ball passed by plain greenlet switches, no hub in between."""
        main = getcurrent()

        def echo() -> None:
            for _ in range(rounds):
                main.switch()

        other = greenlet(echo)
        t0 = time.perf_counter()
        for _ in range(rounds):
            other.switch()
        return (time.perf_counter() - t0) / (2 * rounds) * 1e6

    return {"gevent.sleep(0), nothing else ready": best_us(lambda: gevent.sleep(0), 20000),
            "Event wake-up hop between greenlets":
                _volley(rounds, event_wait, lambda side: events[side].set()),
            "hub-callback wake-up hop (run_callback(g.switch))":
                _volley(rounds, hub_wait,
                        lambda side: hub_.loop.run_callback(sides[side].switch)),
            "direct switch between two greenlets": direct()}


def upstream() -> dict[str, float]:
    node = procs.fake_node("m", "fast", num_parallel=64)
    body = b'{"model": "m", "prompt": "hi", "stream": false}'
    adapter = HTTPAdapter(pool_maxsize=4)
    try:
        def via_send() -> None:
            req = PreparedRequest()
            req.method, req.url, req.body = "POST", node.url + "/api/generate", body
            req.headers = {"Content-Type": "application/json",  # type: ignore[assignment]
                           "Content-Length": str(len(body))}
            if not adapter.send(req, timeout=10).content:  # read it all, as a proxy would
                raise RuntimeError("empty reply")

        pool = adapter.poolmanager.connection_from_url(node.url)

        def via_pool() -> None:
            reply = pool.urlopen("POST", "/api/generate", body=body, retries=False,
                                 headers={"Content-Type": "application/json"})
            if not reply.data:
                raise RuntimeError("empty reply")

        return {"POST via HTTPAdapter.send (client CPU)": cpu_us(via_send, 500),
                "POST via the adapter's urllib3 pool (client CPU)": cpu_us(via_pool, 500)}
    finally:
        adapter.close()
        node.stop()


def main() -> int:
    results = validation() | metrics() | hub() | upstream()
    width = max(map(len, results))
    for name, us in results.items():
        print(f"{name:<{width}}  {us:8.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
