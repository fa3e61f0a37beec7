"""The fast lane: model-routed POSTs go from the WSGI server to their view without Flask's cycle.

Flask stays the application: it hosts every route, this one included, and answers everything
the lane does not take. But for the dozen paths that carry the load (chat, generate, embed and
their OpenAI and Anthropic twins, POST only, exact path), what a Flask request costs per call
buys nothing: no URL variables to match, no session, no request/app context for the view to
read through proxies, no hook that changes the reply (CORS tags only requests with an
``Origin``, which the lane leaves to Flask; the listing filter only touches listings), and no
``Response`` object to build and take apart again. So the lane runs, in the same order as
Flask would, the gate (``app/auth.py``) and the view's own function (``app/proxy.py``), and
writes the reply straight to ``start_response``. A refusal or an error is a Flask
``Response``, served as the WSGI app it is. The lane sits outside the meter (``app/meter.py``)
that wraps Flask, and meters what it answers itself: it knows the reply's status and type
without watching ``start_response``, and a request without a grant costs nothing there. A
whole reply (not a stream) is settled as it is handed to the server, with no wrapper: the
node's work is done and its token counts are in hand; so a key removed by a reload after
such a reply was made no longer empties it (a stream is still cut at its next piece).

An exception in the view is answered as Flask's error handlers answer it: an HTTP error (a
body that arrives too slowly: 408) in the API's error shape, anything else logged and a 500.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from http import HTTPStatus
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException

from app import proxy
from app.auth import Route, gate
from app.errors import http_error_response, unhandled_error_response
from app.meter import GRANT, Metered, end_unanswered
from app.security import Security
from app.tokencount import is_stream
from pipeline.factory import PipelineFactory

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def status_line(code: int) -> str:
    try:
        return f"{code} {HTTPStatus(code).phrase}"
    except ValueError:
        return f"{code} Unknown"


STATUS_LINES = {code: status_line(code) for code in range(100, 600)}


class FastLane:
    """WSGI layer in front of the Flask app: takes the model-routed POSTs, passes the rest."""

    def __init__(self, inner: WsgiApp, factory: Callable[[], PipelineFactory],
                 sec: Security) -> None:
        self.inner = inner
        self.factory = factory  # the live factory (the app's extension)
        self.sec = sec
        self.finish = sec.finish  # the end of an admitted request's accounting (app/meter.py)
        self.settle = sec.settle  # ... and of a whole reply's, at once
        #: path -> the gate's view of the route, as Flask's router would have matched it
        self.routes = {path: Route(f"ollama.{path}", path, None) for path in proxy.MODEL_ROUTED}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        route = self.routes.get(path)
        if route is None or environ["REQUEST_METHOD"] != "POST" or "HTTP_ORIGIN" in environ:
            return self.inner(environ, start_response)
        try:
            out = self._answer(environ, route, path)
        except BaseException:
            end_unanswered(environ, self.finish)
            raise
        grant = environ.pop(GRANT, None)  # the meter around Flask is not passed through
        if isinstance(out, proxy.Reply):
            start_response(STATUS_LINES.get(out.status) or status_line(out.status), out.headers)
            status, ctype, body, ticket = out.status, out.content_type, out.body, out.ticket
        else:
            status, ctype = out.status_code, out.headers.get("Content-Type", "")
            body, ticket = out(environ, start_response), None
        if grant is None:
            return body
        if ticket is None or type(body) is not list or is_stream(ctype):
            return Metered(body, grant, status, ctype, path, self.finish)
        # a whole reply: settled as it is handed to the server (the node's work is done and
        # the ledger has read its token counts), no wrapper watching it go out
        tokens_in, tokens_out = (ticket.tokens_in or 0, ticket.tokens or 0) if (
            grant.counts_tokens) else (0, 0)
        self.settle(grant, status >= 400, tokens_in, tokens_out, time.monotonic())
        return body

    def _answer(self, environ: dict[str, Any], route: Route, path: str
                ) -> proxy.Reply | Response:
        try:
            return gate(environ, route, self.sec) or proxy.proxied(environ, self.factory())
        except HTTPException as exc:  # what Flask's error handlers would answer
            return http_error_response(exc, path)
        except Exception as exc:
            return unhandled_error_response(exc, path)
