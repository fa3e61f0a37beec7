"""CORS as Ollama does it, for browser clients talking to the appliance directly.

Ollama allows origins on localhost, 127.0.0.1 and 0.0.0.0 (any scheme http/https, any port),
the app schemes of desktop and editor shells (app://, file://, tauri://, vscode-webview://,
vscode-file://) and browser extensions, plus the ones in ``OLLAMA_ORIGINS``; here
``server.allowedOrigins`` plays that role (``*`` allows every origin). Preflights get 204.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable

from flask import Flask, Response, request

_LOCAL = re.compile(r"^https?://(localhost|127\.0\.0\.1|0\.0\.0\.0|\[::1\])(:\d+)?$")
_APP_SCHEMES = ("app://", "file://", "tauri://", "vscode-webview://", "vscode-file://",
                "chrome-extension://", "moz-extension://", "safari-web-extension://")
ALLOW_HEADERS = ("Authorization, Content-Type, User-Agent, Accept, X-Requested-With, "
                 "OpenAI-Beta, X-Request-ID, X-Correlation-ID, x-stainless-arch, "
                 "x-stainless-async, x-stainless-custom-poll-interval, x-stainless-helper-method, "
                 "x-stainless-lang, x-stainless-os, x-stainless-package-version, "
                 "x-stainless-poll-helper, x-stainless-retry-count, x-stainless-runtime, "
                 "x-stainless-runtime-version, x-stainless-timeout")
ALLOW_METHODS = "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS"


def allowed(origin: str, extra: tuple[str, ...]) -> bool:
    if _LOCAL.match(origin) or origin.startswith(_APP_SCHEMES):
        return True
    return any(pattern == "*" or fnmatch.fnmatchcase(origin, pattern) for pattern in extra)


def install(app: Flask, origins: Callable[[], tuple[str, ...]]) -> None:
    """Answer preflights and tag replies; ``origins()`` returns the configured patterns."""

    @app.before_request
    def preflight() -> Response | None:
        env = request.environ
        origin = env.get("HTTP_ORIGIN")
        if env["REQUEST_METHOD"] != "OPTIONS" or origin is None:
            return None
        if not allowed(origin, origins()):
            return Response(status=403)
        return Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Vary": "Origin",
            "Access-Control-Allow-Methods": ALLOW_METHODS,
            "Access-Control-Allow-Headers": ALLOW_HEADERS, "Access-Control-Max-Age": "43200"})

    @app.after_request
    def tag(resp: Response) -> Response:
        origin = request.environ.get("HTTP_ORIGIN")
        if origin and allowed(origin, origins()):
            resp.headers["Access-Control-Allow-Origin"] = origin
            resp.headers["Vary"] = "Origin"
        return resp
