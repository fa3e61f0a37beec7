"""Fixtures: real servers on port 0 (simulated nodes, the appliance), real clients.

gevent patches the standard library before anything imports socket, ssl, httpx or requests.
Every appliance a test starts is shut down afterwards, and the teardown asserts that no node
slot and no pipeline admission was left held: a leak fails the test that caused it. A greenlet
that dies with an exception fails the test too.
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)  # watchdog: see app/reload.py

import os
from collections.abc import Callable, Iterator
from typing import Any

import gevent
import pytest

from app.fakenode import FakeNodeServer, make_profile
from app.server import OllamaLoadBalancerApplication
from pipeline.config import parse_config

pytest_plugins = ["tests.redisserver", "tests.deploy.artifacts"]  # redis_proc; artifacts

os.environ.pop("OLLAMA_LB_ADMIN_TOKEN", None)
for _var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy",
             "all_proxy"):
    os.environ.pop(_var, None)
os.environ["NO_PROXY"] = "*"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: Any, call: Any) -> Iterator[None]:
    """In CI (``CI=true``) a test skipped for want of a tool fails instead: a missing install
    step in ``.ci/run`` must not go green. Benchmarks (skipped by ``make test`` on purpose) are
    exempt."""
    outcome = yield
    report = outcome.get_result()
    if (report.skipped and os.environ.get("CI") == "true"
            and item.get_closest_marker("benchmark") is None
            and "benchmark" not in item.fixturenames):
        report.outcome = "failed"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.longrepr = f"skipped in CI, which must install what this test needs: {reason}"


def _live_greenlets() -> list[str]:
    """Greenlets still running code of ours (app/, pipeline/), by function name."""
    import gc

    live = []
    for obj in gc.get_objects():
        if isinstance(obj, gevent.Greenlet) and not obj.dead:
            fn = getattr(obj, "_run", None) or getattr(obj, "run", None)
            module = getattr(fn, "__module__", "") or ""
            if module.startswith(("app.", "pipeline.")):
                where, frame = [], obj.gr_frame  # innermost first: where it is waiting
                while frame is not None and len(where) < 4:
                    where.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:"
                                 f"{frame.f_lineno}")
                    frame = frame.f_back
                live.append(f"{module}.{getattr(fn, '__qualname__', fn)} ({' < '.join(where)})")
    return live


@pytest.fixture(autouse=True)
def greenlet_errors() -> Iterator[list[Any]]:
    """Record exceptions that kill greenlets; fail the test if any occurred.

    Also, once every other fixture has torn down, no greenlet of ours may still run.
    """
    hub = gevent.get_hub()
    seen: list[Any] = []
    original = hub.handle_error

    def record(context: Any, type_: Any, value: Any, tb: Any) -> None:
        if not isinstance(value, gevent.GreenletExit | KeyboardInterrupt | SystemExit):
            seen.append((context, type_, value))
        original(context, type_, value, tb)

    hub.handle_error = record  # type: ignore[method-assign]
    yield seen
    hub.handle_error = original  # type: ignore[method-assign]
    assert not seen, f"greenlets crashed: {seen}"
    # Greenlets told to stop end on their next turn: give them turns before looking. A scan of
    # the heap can itself take seconds (after big imports), so the bound counts scans too.
    gevent.sleep(0.05)
    for _ in range(40):
        if not (left := _live_greenlets()):
            break
        gevent.sleep(0.05)
    assert not left, f"greenlets left running: {left}"


@pytest.fixture
def fake_node() -> Iterator[Callable[..., FakeNodeServer]]:
    """Start simulated nodes: ``fake_node(["llama3.2"], profile="fast", num_parallel=2)``."""
    started: list[FakeNodeServer] = []

    def make(models: list[str], profile: str = "fast", fault: str = "none",
             fault_api: bool = False, library: list[str] | None = None,
             **overrides: Any) -> FakeNodeServer:
        server = FakeNodeServer(models, make_profile(profile, **overrides), fault=fault,
                                fault_api=fault_api, library=library)
        started.append(server.start())
        return server

    yield make
    for server in started:
        server.stop()


def lb_config(nodes: list[FakeNodeServer], **sections: Any) -> dict[str, Any]:
    """A config dict for nodes n0, n1, ... with quick health checks; sections override."""
    node_overrides = sections.pop("node_overrides", {})
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 2},
        "nodes": [{"id": f"n{i}", "url": n.url, "maxConcurrentRequests": 4,
                   **node_overrides.get(i, {})} for i, n in enumerate(nodes)],
        "healthCheck": {"intervalMs": 200, "modelRefreshMs": 200},
        "timeouts": {"connectTimeoutMs": 1000, "healthCheckTimeoutMs": 500,
                     "requestTimeoutMs": 20000},
        "retry": {"initialBackoffMs": 5, "maxBackoffMs": 20},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def assert_no_leaks(app: OllamaLoadBalancerApplication, timeout: float = 5.0) -> None:
    """Every node slot, admission, trial, stream and upstream connection given back, and every
    stage greenlet alive (streams close asynchronously, so this waits a little)."""
    assert app.factory is not None
    p = app.factory.pipeline
    deadline = gevent.time.time() + timeout  # type: ignore[attr-defined]
    nodes = app.factory.node_registry.all_nodes() + app.factory.node_registry.removed_nodes()
    while gevent.time.time() < deadline:  # type: ignore[attr-defined]
        if (p.in_flight == 0 and all(n.in_flight == 0 for n in nodes)
                and app.factory.upstream.checked_out == 0):
            break
        gevent.sleep(0.02)
    held = {n.id: n.in_flight for n in nodes if n.in_flight}
    assert p.in_flight == 0, f"pipeline admissions leaked: {p.in_flight}"
    assert not held, f"node slots leaked: {held}"
    assert len(p.queue) == 0, "requests left in the capacity queue"
    trials = [n.id for n in nodes if n.breaker.trial_out]
    assert not trials, f"half-open trials left out: {trials}"
    assert app.factory.upstream.checked_out == 0, (
        f"upstream connections left checked out: {app.factory.upstream.checked_out}")
    assert not p.streams, f"streams left open: {len(p.streams)}"
    dead = [s.name for s in p.stages if s.greenlet is None or s.greenlet.dead]
    assert not dead, f"stage greenlets dead: {dead}"


@pytest.fixture
def appliance() -> Iterator[Callable[..., OllamaLoadBalancerApplication]]:
    """Start the appliance in front of nodes: ``appliance(nodes, strategy={...})``."""
    started: list[OllamaLoadBalancerApplication] = []

    def make(nodes: list[FakeNodeServer], *, discover: bool = True, check_leaks: bool = True,
             **sections: Any) -> OllamaLoadBalancerApplication:
        cfg = parse_config(lb_config(nodes, **sections))
        app = OllamaLoadBalancerApplication(cfg, watch=False).start()
        app.check_leaks = check_leaks  # type: ignore[attr-defined]
        if discover:  # learn the nodes' models before the test's first request
            assert app.factory is not None
            app.factory.health_checker.check_all(discover=True)
        started.append(app)
        return app

    yield make
    for app in started:
        try:
            if getattr(app, "check_leaks", True):
                assert_no_leaks(app)
        finally:
            app.shutdown(drain_s=0)
