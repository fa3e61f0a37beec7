"""The simulator's HTTP control routes, ``/_fake/*``: its counters and the fault switch.

Off unless the node is started with ``fault_api=True`` (``ollama-lb fake-node --fault-api``):
a real Ollama has no such routes, so by default they answer 404 like any unknown path, and
nobody who can reach a demo node can make it misbehave. In-process tests use
``node.set_fault()`` and ``node.stats`` instead.
"""

from __future__ import annotations

from app.fakenode.faults import FaultSwitch
from app.fakenode.router import Route, Router
from app.fakenode.sim import Simulator
from app.fakenode.wire import Call, HTTPError, Reply, json_reply


class ControlAPI:
    """``GET /_fake/stats`` and ``POST /_fake/fault {"mode": ..., "count": ...}``."""

    def __init__(self, sim: Simulator, faults: FaultSwitch) -> None:
        self.sim = sim
        self.faults = faults

    def register(self, router: Router) -> None:
        router.add("GET", "/_fake/stats", Route(self.stats, faultable=False))
        router.add("POST", "/_fake/fault", Route(self.fault, faultable=False))

    def stats(self, call: Call) -> Reply:
        data = self.sim.stats.as_dict()
        data["loaded"] = sorted(r.name for r in self.sim.loaded.values())
        data["fault"] = self.faults.mode
        return json_reply(call.start_response, 200, data)

    def fault(self, call: Call) -> Reply:
        count = call.body.get("count")
        if count is not None and (not isinstance(count, int) or isinstance(count, bool)):
            raise HTTPError(400, "count must be an integer")
        try:
            self.faults.set(str(call.body.get("mode", "none")), count)
        except ValueError as exc:
            raise HTTPError(400, str(exc)) from None
        return json_reply(call.start_response, 200, {"fault": self.faults.mode})
