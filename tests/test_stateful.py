"""A stateful property test: random sequences of what production does to the appliance.

Hypothesis drives the real appliance (server on port 0, pipeline, health checker) in front of
three simulated nodes through random sequences of requests (streamed or not, generate and chat,
several in flight, real HTTP from greenlets), node faults and recoveries, circuits opened and
their half-open trial meeting a fault or a leaving client, clients that leave, streams cancelled
after a line, short deadlines and reloads (node caps, ``maxGlobalInFlight``). After every step:

- every finished request got exactly one well-formed answer: a complete reply, one error in
  Ollama's shape, or a stream that ends with ``done`` or with one error line;
- once drained, nothing is held: no admission, node slot, queue entry, half-open trial,
  upstream connection or stream (``assert_no_leaks``), no node generating for nobody;
- a node healthy again is admitted within its recovery time (plus the longest deadline of the
  requests it may still be failing, plus slack).

Examples are derandomized so a failure reproduces. To hunt, ``STATEFUL_EXPLORE=1`` draws new
ones (``--hypothesis-seed=N`` replays a run), ``STATEFUL_EXAMPLES=300`` runs more (with
``-o timeout=1500``) and ``STATEFUL_SHRINK=1`` reduces a failure.
"""

from __future__ import annotations

import json
import os
import select
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import requests
from hypothesis import HealthCheck, Phase, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from app.fakenode import FakeNodeServer, make_profile
from app.server import OllamaLoadBalancerApplication
from pipeline.breaker import CircuitState
from pipeline.config import parse_config
from pipeline.node import Node
from tests.conftest import assert_no_leaks, lb_config
from tests.waiting import wait_until

NODES = 3
RECOVERY_MS = 150
FIRST_BYTE_MS = 250
STREAM_IDLE_MS = 1000
CLIENT_TIMEOUT_S = 8.0  # far past any deadline used here: hitting it means no answer came
SLACK_S = 1.0
PROFILE = make_profile("fast", decode_tps=100.0, tokens=6)  # ~60 ms a reply: requests overlap
ERROR_STATUSES = {500, 502, 503, 504}

PATHS = st.sampled_from(["/api/generate", "/api/chat"])
MODELS = st.sampled_from(["m"] + [f"p{i}" for i in range(NODES)])  # p<i>: only on node i
NODE = st.integers(0, NODES - 1)
# Not "reset-mid-stream": the simulated node's stream:false path lets its StreamReset escape
# (the hub reports a crashed greenlet), a bug of the fake, not of the appliance.
FAULTS = ["500", "hang", "reset", "error-mid-stream", "malformed"]
DEADLINES_MS = [250, 500, 800]


def start_appliance(nodes: list[FakeNodeServer], **sections: Any
                    ) -> OllamaLoadBalancerApplication:
    """As the ``appliance`` fixture starts it, every node's models known (see the xfail)."""
    app = OllamaLoadBalancerApplication(parse_config(lb_config(nodes, **sections)),
                                        watch=False).start()
    assert app.factory is not None
    registry, checker = app.factory.node_registry, app.factory.health_checker
    for _ in range(3):  # a busy machine can time a discovery out
        checker.check_all(discover=True)
        if all(n.installed is not None for n in registry.all_nodes()):
            return app
    app.shutdown(drain_s=0)
    raise AssertionError("the nodes' models could not be discovered")


def payload(path: str, model: str, stream: bool) -> dict[str, Any]:
    if path == "/api/chat":
        return {"model": model, "messages": [{"role": "user", "content": "hi"}],
                "stream": stream}
    return {"model": model, "prompt": "hi", "stream": stream}


@dataclass
class Call:
    """One client's request and everything it received."""

    path: str
    model: str
    stream: bool
    cancel: bool = False  # the client closes the stream after its first line
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    lines: list[bytes] = field(default_factory=list)
    client_error: str | None = None  # the HTTP client raised: no (complete) answer came
    greenlet: gevent.Greenlet | None = None

    def run(self, base: str) -> None:
        try:
            body = payload(self.path, self.model, self.stream)
            with requests.post(base + self.path, json=body, stream=True,
                               timeout=CLIENT_TIMEOUT_S) as r:
                self.status, self.headers = r.status_code, dict(r.headers)
                if not (self.stream and r.status_code == 200):
                    self.body = r.content
                    return
                for line in r.iter_lines():
                    self.lines.append(line)
                    if self.cancel:
                        return  # leaving the with block closes the connection mid-stream
        except requests.RequestException as exc:
            self.client_error = f"{type(exc).__name__}: {exc}"

    def __str__(self) -> str:
        kind = "cancelled stream" if self.cancel else "stream" if self.stream else "request"
        return f"{kind} {self.path} {self.model}"


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:  # not JSON: the checks below say what it should have been
        return None


def is_reply(obj: Any, path: str) -> bool:
    """A final (or complete) Ollama reply of generate or chat."""
    key, kind = ("message", dict) if path == "/api/chat" else ("response", str)
    return isinstance(obj, dict) and obj.get("done") is True and isinstance(obj.get(key), kind)


def is_error(obj: Any) -> bool:
    """Ollama's error shape: one key, a non-empty message."""
    return (isinstance(obj, dict) and list(obj) == ["error"]
            and isinstance(obj["error"], str) and bool(obj["error"]))


def answer_problem(call: Call) -> str | None:
    """What is wrong with a finished call's answer, or None when it is one well-formed answer."""
    if call.client_error is not None:
        return f"{call}: no answer ({call.client_error})"
    if call.status == 200 and call.stream:
        return stream_problem(call)
    obj = _json(call.body)
    if call.status == 200:
        return None if is_reply(obj, call.path) else f"{call}: incomplete reply {call.body!r}"
    if call.status not in ERROR_STATUSES or not is_error(obj):
        return f"{call}: not one Ollama error: HTTP {call.status} {call.body[:300]!r}"
    if call.status == 503 and "Retry-After" not in call.headers:
        return f"{call}: 503 without Retry-After"
    return None


def stream_problem(call: Call) -> str | None:
    """NDJSON objects only; ends with done, or with exactly one error line (then nothing)."""
    objs = [_json(line) for line in call.lines]
    if any(not isinstance(o, dict) for o in objs):
        return f"{call}: a line that is not a JSON object: {call.lines!r}"
    errors = [i for i, o in enumerate(objs) if "error" in o]
    if errors and (errors != [len(objs) - 1] or not is_error(objs[-1])):
        return f"{call}: error lines not one at the end: {call.lines!r}"
    if call.cancel:
        return None if objs else f"{call}: a 200 stream without a line"
    if not errors and not (objs and is_reply(objs[-1], call.path)):
        return f"{call}: stream truncated without an error line: {call.lines!r}"
    return None


def outcome(call: Call) -> str:
    """How a well-formed call ended, for ``--hypothesis-show-statistics`` (what was covered)."""
    if not call.lines:
        return f"{'stream' if call.stream else 'reply'} {call.status}"
    ending = "error line" if "error" in _json(call.lines[-1]) else "done"
    return f"stream 200, {'cancelled' if call.cancel else ending}"


class ApplianceMachine(RuleBasedStateMachine):
    """The appliance, its nodes and the requests in flight; rules: clients, nodes, operators."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: list[FakeNodeServer] = []
        self.app: OllamaLoadBalancerApplication | None = None
        self.calls: list[Call] = []
        self.caps = [2] * NODES
        self.max_global = 64
        self.deadline_ms = DEADLINES_MS[-1]
        self.longest_deadline_ms = self.deadline_ms  # of any request that may be in flight
        self.faulty: set[int] = set()  # nodes given a fault and not recovered since

    def sections(self) -> dict[str, Any]:
        return {
            "node_overrides": {i: {"maxConcurrentRequests": c} for i, c in enumerate(self.caps)},
            "disruptor": {"maxGlobalInFlight": self.max_global},
            "healthCheck": {"intervalMs": 100, "modelRefreshMs": 60_000,
                            "circuitBreakerFailureThreshold": 2,
                            "circuitBreakerRecoveryMs": RECOVERY_MS},
            "timeouts": {"connectTimeoutMs": 500, "healthCheckTimeoutMs": 1000,
                         "requestTimeoutMs": self.deadline_ms, "firstByteTimeoutMs": FIRST_BYTE_MS,
                         "streamIdleTimeoutMs": STREAM_IDLE_MS}}

    @initialize()
    def start(self) -> None:
        self.nodes = [FakeNodeServer(["m", f"p{i}"], PROFILE).start() for i in range(NODES)]
        self.app = start_appliance(self.nodes, **self.sections())

    # --- what clients do ------------------------------------------------------------------------

    def _spawn(self, call: Call) -> None:
        assert self.app is not None
        call.greenlet = gevent.spawn(call.run, self.app.url)
        self.calls.append(call)

    @rule(path=PATHS, model=MODELS, stream=st.booleans(), count=st.integers(1, 3))
    def send(self, path: str, model: str, stream: bool, count: int) -> None:
        for _ in range(count):  # in flight together
            self._spawn(Call(path, model, stream))

    @rule(path=PATHS, model=MODELS)
    def cancel_stream(self, path: str, model: str) -> None:
        self._spawn(Call(path, model, True, cancel=True))

    @rule(path=PATHS, model=MODELS, stream=st.booleans())
    def client_leaves(self, path: str, model: str, stream: bool) -> None:
        """A raw client sends a request, closes once a node has it (or answered, or queued)."""
        assert self.app is not None
        host, port = self.app.url.rsplit("//", 1)[1].rsplit(":", 1)
        seen = sum(n.stats.by_path.get(path, 0) for n in self.nodes)
        data = json.dumps(payload(path, model, stream)).encode()
        with socket.create_connection((host, int(port)), timeout=5) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: lb\r\nContent-Type: application/json"
                         f"\r\nContent-Length: {len(data)}\r\n\r\n".encode() + data)
            wait_until(lambda: sum(n.stats.by_path.get(path, 0) for n in self.nodes) > seen
                       or select.select([sock], [], [], 0)[0], 0.5, step=0.01)

    # --- what nodes do --------------------------------------------------------------------------

    def _set_fault(self, node: int, mode: str) -> None:
        self.nodes[node].node.set_fault(mode)
        (self.faulty.discard if mode == "none" else self.faulty.add)(node)

    @rule(node=NODE, mode=st.sampled_from(FAULTS), path=PATHS, stream=st.booleans(),
          count=st.integers(1, 2))
    def fault(self, node: int, mode: str, path: str, stream: bool, count: int) -> None:
        """The node starts failing; requests only it serves meet the fault (two open it)."""
        self._set_fault(node, mode)
        for i in range(count):  # the second one the other way (streamed or not)
            self._spawn(Call(path, f"p{node}", stream != bool(i)))

    @rule(node=NODE, meets=st.sampled_from(["none", "hang", "reset", "500", "leave"]),
          path=PATHS, stream=st.booleans())
    def trial(self, node: int, meets: str, path: str, stream: bool) -> None:
        """The node's circuit opens (two 500s), its recovery time passes, and the half-open
        trial meets ``meets``: success, a hang, a reset, a 500, or its client leaving."""
        n, model = self._node(node), f"p{node}"
        self._set_fault(node, "500")
        opening = [Call(path, model, stream) for _ in range(2)]
        for call in opening:
            self._spawn(call)
        on_trial = (wait_until(lambda: n.circuit is not CircuitState.CLOSED
                               or all(c.greenlet.dead for c in opening), 2.0)
                    and wait_until(lambda: n.circuit is CircuitState.HALF_OPEN
                                   and not n.breaker.trial_out, RECOVERY_MS / 1000 + SLACK_S))
        # the node's fault does not depend on timing, so neither do the rules drawn next
        self._set_fault(node, "none" if meets == "leave" else meets)
        if not on_trial:
            return  # shed, queued behind other work, or another request took the trial
        if meets == "leave":
            self.client_leaves(path, model, stream)
        else:
            self._spawn(Call(path, model, stream))

    @precondition(lambda self: self.faulty)
    @rule(data=st.data())
    def recovery_time_passes(self, data: st.DataObject) -> None:
        """Time passes until a failing node's open circuit lets a trial through (if open)."""
        n = self._node(data.draw(st.sampled_from(sorted(self.faulty)), label="node"))
        assert wait_until(lambda: n.circuit is not CircuitState.OPEN, RECOVERY_MS / 1e3 + SLACK_S)

    @precondition(lambda self: self.faulty)
    @rule(data=st.data())
    def recover(self, data: st.DataObject) -> None:
        """Healthy again: a request that only this node serves succeeds within the bound."""
        node = data.draw(st.sampled_from(sorted(self.faulty)), label="node")
        self._set_fault(node, "none")
        bound = RECOVERY_MS / 1000 + self.longest_deadline_ms / 1000 + SLACK_S
        t0 = time.monotonic()
        ok = wait_until(lambda: self._served(f"p{node}", bound), bound, step=0.05)
        took = time.monotonic() - t0
        assert ok and took <= bound, (
            f"node n{node} healthy again but not admitted after {took:.2f} s (bound {bound:.2f}"
            f" s): {self._node(node).snapshot()}, trial out: {self._node(node).breaker.trial_out}")

    def _served(self, model: str, timeout: float) -> bool:
        assert self.app is not None
        try:
            r = requests.post(f"{self.app.url}/api/generate",
                              json=payload("/api/generate", model, False), timeout=timeout)
        except requests.RequestException:
            return False
        return r.status_code == 200 and is_reply(_json(r.content), "/api/generate")

    def _node(self, node: int) -> Node:
        assert self.app is not None and self.app.factory is not None
        return self.app.factory.node_registry.all_nodes()[node]

    # --- what operators do ----------------------------------------------------------------------

    def _reload(self) -> None:
        assert self.app is not None and self.app.factory is not None
        self.app.factory.apply_config(parse_config(lb_config(self.nodes, **self.sections())))

    @rule(caps=st.lists(st.sampled_from([1, 2, 4]), min_size=NODES, max_size=NODES),
          max_global=st.sampled_from([2, 8, 64]))
    def reload(self, caps: list[int], max_global: int) -> None:
        self.caps, self.max_global = caps, max_global
        self._reload()

    @rule(deadline_ms=st.sampled_from(DEADLINES_MS))
    def set_deadline(self, deadline_ms: int) -> None:
        self.deadline_ms = deadline_ms
        self.longest_deadline_ms = max(self.longest_deadline_ms, deadline_ms)
        self._reload()

    # --- the checks -----------------------------------------------------------------------------

    @invariant()
    def every_finished_request_got_one_well_formed_answer(self) -> None:
        for call in self.calls:
            if call.greenlet is not None and call.greenlet.dead:
                problem = answer_problem(call)
                assert problem is None, problem
                event(outcome(call))  # once per example, however often it is seen

    @precondition(lambda self: self.calls)
    @rule()
    def drain(self) -> None:
        """Wait for every request to end, then nothing may be left held anywhere."""
        assert self.app is not None
        budget = self.longest_deadline_ms / 1000 + STREAM_IDLE_MS / 1000 + SLACK_S * 2
        greenlets = [c.greenlet for c in self.calls if c.greenlet is not None]
        gevent.joinall(greenlets, timeout=budget)
        left = [str(c) for c in self.calls if c.greenlet is not None and not c.greenlet.dead]
        assert not left, f"requests unanswered after {budget:.1f} s: {left}"
        self.every_finished_request_got_one_well_formed_answer()
        self.calls.clear()
        assert_no_leaks(self.app, timeout=3.0)
        assert wait_until(lambda: not self._generating(), 2.0), (
            f"nodes still generating for nobody: {self._generating()}")
        self.longest_deadline_ms = self.deadline_ms

    def _generating(self) -> dict[int, tuple[int, int]]:
        """(requests being handled, streams open) of every node still busy."""
        return {i: (n.stats.active, n.stats.streams_open) for i, n in enumerate(self.nodes)
                if n.stats.active or n.stats.streams_open}

    def teardown(self) -> None:
        try:
            if self.app is not None and self.calls:
                self.drain()
        finally:
            gevent.killall([c.greenlet for c in self.calls if c.greenlet is not None],
                           block=False)
            if self.app is not None:
                self.app.shutdown(drain_s=0)
            # a node with hung handlers takes half a second to stop: stop them side by side
            gevent.joinall([gevent.spawn(node.stop) for node in self.nodes])


# Shrinking re-runs a failing sequence for minutes: in `make test` it is reported as found.
PHASES = [Phase.explicit, Phase.reuse, Phase.generate]
SETTINGS = settings(max_examples=int(os.environ.get("STATEFUL_EXAMPLES", 15)),
                    stateful_step_count=12, deadline=None,
                    derandomize=not os.environ.get("STATEFUL_EXPLORE"), database=None,
                    phases=PHASES + ([Phase.shrink] if os.environ.get("STATEFUL_SHRINK") else []),
                    report_multiple_bugs=False, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow])

TestRandomTrafficFaultsAndReloads = ApplianceMachine.TestCase
TestRandomTrafficFaultsAndReloads.settings = SETTINGS


# --- found by the machine above -----------------------------------------------------------------

def test_404_from_a_node_with_an_unknown_model_list_is_retried_where_the_model_is(
        fake_node, appliance):
    has, unknown = fake_node(["p"]), fake_node(["other"])
    lb = appliance([has, unknown], discover=False, strategy={"type": "round-robin"},
                   healthCheck={"enabled": False, "discovery": False})
    lb.factory.health_checker.discover(lb.factory.node_registry.get("n0"))  # n1's never ran
    statuses = [requests.post(f"{lb.url}/api/generate", json=payload("/api/generate", "p", False),
                              timeout=10).status_code for _ in range(2)]
    assert unknown.stats.by_path.get("/api/generate") == 1  # round-robin: one went to n1
    assert statuses == [200, 200]
