"""The simulated Ollama node as one WSGI app: counters, routing, faults, the APIs.

Plain WSGI rather than Flask: as the "direct" baseline in benchmarks it must cost as little as
possible, so that the appliance's overhead is what the numbers show. The layers, outside in:
``FakeNode`` counts what it sees (tests assert on it), ``Routing`` answers unknown paths as
Gin does, ``FaultLayer`` injects the chosen fault, ``Dispatch`` runs the API handler.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from app.fakenode.anthropic_api import MessagesAPI
from app.fakenode.blobs import BlobsAPI
from app.fakenode.control import ControlAPI
from app.fakenode.engine import Engine
from app.fakenode.faults import FAULTS, FaultLayer, FaultSwitch
from app.fakenode.manage import ManageAPI
from app.fakenode.native import NativeAPI
from app.fakenode.openai_api import OpenAIAPI
from app.fakenode.responses import ResponsesAPI
from app.fakenode.router import Dispatch, Router, Routing
from app.fakenode.sim import Profile, Simulator, Stats
from app.fakenode.store import Blob
from app.fakenode.wire import StartResponse

__all__ = ["FAULTS", "FakeNode"]


class FakeNode:
    """The node: a simulator, a fault switch, and the Ollama APIs on top.

    ``fault_api=True`` adds the HTTP control routes (``/_fake/stats``, ``/_fake/fault``);
    without it they answer 404 like any path Ollama does not serve, and faults are set only
    in-process with ``set_fault``. ``library`` lists the models the registry has for pulls
    (None: every validly named model).
    """

    def __init__(self, models: Iterable[str], profile: Profile, version: str = "0.12.6",
                 fault: str = "none", flap_period: float = 2.0, fault_api: bool = False,
                 library: Iterable[str] | None = None) -> None:
        self.sim = Simulator(list(models), profile, library)
        self.version = version
        self.faults = FaultSwitch(fault, flap_period)
        self.router = Router()
        engine = Engine(self.sim)
        NativeAPI(engine, lambda: self.version).register(self.router)
        OpenAIAPI(engine).register(self.router)
        ResponsesAPI(engine).register(self.router)
        MessagesAPI(engine).register(self.router)
        ManageAPI(engine).register(self.router)
        BlobsAPI(self.sim).register(self.router)
        self.fault_api = fault_api
        if fault_api:  # off by default: a real Ollama has no /_fake/* routes
            ControlAPI(self.sim, self.faults).register(self.router)
        self._app = Routing(self.router, FaultLayer(self.faults, Dispatch(self._record_body)))

    # --- what tests read and set ----------------------------------------------------------------

    @property
    def stats(self) -> Stats:
        return self.sim.stats

    @property
    def fault(self) -> str:
        return self.faults.mode

    @property
    def fault_count(self) -> int | None:
        return self.faults.count

    @property
    def flap_period(self) -> float:
        return self.faults.flap_period

    @flap_period.setter
    def flap_period(self, seconds: float) -> None:
        self.faults.flap_period = seconds

    @property
    def blobs(self) -> dict[str, Blob]:
        """The blobs the node has, by ``sha256:<hex>`` (sizes and first bytes, not data)."""
        return self.sim.blobs

    def set_fault(self, mode: str, count: int | None = None) -> None:
        """Switch the fault mode in-process; ``count`` limits it to that many requests."""
        self.faults.set(mode, count)

    # --- WSGI -----------------------------------------------------------------------------------

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        stats = self.sim.stats
        stats.requests += 1
        stats.by_path[path] = stats.by_path.get(path, 0) + 1
        stats.hosts.add(environ.get("HTTP_HOST", ""))
        return self._app(environ, start_response)

    def _record_body(self, body: bytes) -> None:
        self.sim.stats.last_body = body
