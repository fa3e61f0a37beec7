"""Fault injection, as a WSGI layer of its own between routing and the handlers.

``FaultSwitch`` holds the mode tests set (``node.set_fault(mode, count)``) and decides the
fault for each request; ``FaultLayer`` applies the faults that strike before a reply starts
(reset, hang, 500, 503) and leaves the mid-stream ones to the decode loop through the environ
key ``ollama_lb.fault``. The modes, for the chaos tests:

``hang`` (never answer), ``reset`` (RST before headers), ``reset-mid-stream``,
``error-mid-stream``, ``stall-mid-stream`` (stops sending after two tokens), ``500``, ``503``,
``malformed`` (invalid JSON), ``flap`` (alternates healthy and reset every ``flap_period``
seconds, health checks included). ``refuse`` is a server-level state (see server.py).

Counted faults (``count=N``) and every mode but ``flap`` strike inference routes only, so
health checks and model listings keep working while a node misbehaves.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

import gevent

from app.fakenode.router import ROUTE_KEY, Route, WSGIApp
from app.fakenode.sockets import reset
from app.fakenode.wire import BUSY, StartResponse, json_reply

FAULTS = ("none", "hang", "reset", "reset-mid-stream", "error-mid-stream", "stall-mid-stream",
          "500", "503", "malformed", "flap", "refuse")
FAULT_KEY = "ollama_lb.fault"
RUNNER_DIED = "llama runner process has terminated: exit status 2"


class FaultSwitch:
    """The active fault mode and how many more requests it may strike."""

    def __init__(self, mode: str = "none", flap_period: float = 2.0) -> None:
        self.mode = "none"
        self.count: int | None = None  # strike only this many more requests
        self.flap_period = flap_period
        self.set(mode)

    def set(self, mode: str, count: int | None = None) -> None:
        if mode not in FAULTS:
            raise ValueError(f"unknown fault {mode!r}; valid: {', '.join(FAULTS)}")
        self.mode = mode
        self.count = count

    def decide(self, route: Route) -> str:
        """The fault for one request on ``route``; consumes one count when it strikes."""
        mode = self.mode
        if mode == "none" or not route.faultable:
            return "none"
        if mode == "flap":
            return "reset" if int(time.time() / self.flap_period) % 2 else "none"
        if not route.inference:
            return "none"
        if self.count is not None:
            if self.count <= 0:
                return "none"
            self.count -= 1
        return mode


class FaultLayer:
    """Applies the chosen fault before the handler runs, or hands it down in the environ."""

    def __init__(self, switch: FaultSwitch, inner: WSGIApp) -> None:
        self.switch = switch
        self.inner = inner

    def __call__(self, environ: dict[str, Any], sr: StartResponse) -> Iterable[bytes]:
        route: Route = environ[ROUTE_KEY]
        fault = self.switch.decide(route)
        if fault == "reset":
            reset(environ.get("ollama_lb.socket"))
            return []
        if fault == "hang":
            gevent.sleep(3600)
        if fault == "500":
            return json_reply(sr, 500, route.busy_shape(500, RUNNER_DIED))
        if fault == "503":
            return json_reply(sr, 503, route.busy_shape(503, BUSY))
        environ[FAULT_KEY] = fault
        return self.inner(environ, sr)
