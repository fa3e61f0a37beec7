"""Routing as Gin does it for Ollama, and the last WSGI layer that runs a route's handler.

The node is three WSGI layers: ``Routing`` (404/405 in Gin's words, the route put in the
environ), the fault layer (faults.py), and ``Dispatch`` (JSON body, handler, the route's error
shape). Each route says which error shape its API speaks and whether faults apply to it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from app.fakenode.engine import StreamReset
from app.fakenode.sim import ServerBusy
from app.fakenode.wire import (
    BUSY,
    Call,
    ErrorShape,
    HTTPError,
    Reply,
    StartResponse,
    json_reply,
    native_error,
    read_json,
    text,
)

WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]
ROUTE_KEY = "ollama_lb.route"


@dataclass(frozen=True)
class Route:
    """A handler and how the layers around it treat it."""

    handler: Callable[[Call], Reply]
    shape: ErrorShape = native_error  # how an HTTPError from the handler is answered
    busy_shape: ErrorShape = native_error  # a full scheduler queue, and the 500/503 faults
    inference: bool = False  # the request faults (hang, reset, 500, ...) apply
    faultable: bool = True  # flap applies (it hits health checks too)
    json_body: bool = True  # a POST or DELETE body is decoded as JSON first


class Router:
    """Exact paths (HEAD answered as GET) first, then path prefixes with their methods."""

    def __init__(self) -> None:
        self._exact: dict[tuple[str, str], Route] = {}
        self._prefixes: list[tuple[frozenset[str], str, Route]] = []

    def add(self, method: str, path: str, route: Route) -> None:
        self._exact[(method, path)] = route

    def add_prefix(self, methods: Iterable[str], prefix: str, route: Route) -> None:
        self._prefixes.append((frozenset(methods), prefix, route))

    def resolve(self, method: str, path: str) -> Route | None:
        route = self._exact.get(("GET" if method == "HEAD" else method, path))
        if route is not None:
            return route
        for methods, prefix, candidate in self._prefixes:
            if method in methods and path.startswith(prefix):
                return candidate
        return None

    def known(self, path: str) -> bool:
        return any(p == path for _, p in self._exact)


class Routing:
    """First layer: find the route or answer as Gin does (plain-text 404, 405)."""

    def __init__(self, router: Router, inner: WSGIApp) -> None:
        self.router = router
        self.inner = inner

    def __call__(self, environ: dict[str, Any], sr: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        route = self.router.resolve(environ["REQUEST_METHOD"], path)
        if route is None:
            if self.router.known(path):
                return text(sr, 405, "405 method not allowed")
            return text(sr, 404, "404 page not found")
        environ[ROUTE_KEY] = route
        return self.inner(environ, sr)


class Dispatch:
    """Last layer: decode the body, run the handler, answer its errors in the API's shape."""

    def __init__(self, on_body: Callable[[bytes], None]) -> None:
        self.on_body = on_body  # the node records the last body, byte for byte

    def __call__(self, environ: dict[str, Any], sr: StartResponse) -> Iterable[bytes]:
        route: Route = environ[ROUTE_KEY]
        try:
            body = {}
            if route.json_body and environ["REQUEST_METHOD"] in ("POST", "DELETE"):
                body = read_json(environ)
                self.on_body(environ.get("ollama_lb.body", b""))
            return route.handler(Call(environ, sr, body))
        except HTTPError as exc:
            return json_reply(sr, exc.status, route.shape(exc.status, exc.message))
        except ServerBusy:
            return json_reply(sr, 503, route.busy_shape(503, BUSY))
        except StreamReset:  # a whole reply cut by reset-mid-stream: the socket is gone
            return []
