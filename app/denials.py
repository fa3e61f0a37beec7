"""Refusals (401, 403, 429) in the shape of the API the client speaks.

Native paths: Ollama's ``{"error": "..."}``. ``/v1``: OpenAI's error object, with the type and
code OpenAI uses (``invalid_api_key``, ``rate_limit_exceeded``), so SDKs raise their own
AuthenticationError, PermissionDeniedError and RateLimitError. ``/v1/messages``: Anthropic's
``{"type": "error", "error": {...}}``. A message never contains the key or any header value.
"""

from __future__ import annotations

from typing import Any

from flask import Response

from app.errors import anthropic_error, json_response
from pipeline.endpoints import ANTHROPIC, OPENAI, api_for

UNAUTHORIZED = "unauthorized"
_OPENAI = {401: ("invalid_request_error", "invalid_api_key"),
           403: ("permission_error", "forbidden"),
           429: ("requests", "rate_limit_exceeded")}


def body(status: int, message: str, path: str, reason: str = "") -> dict[str, Any]:
    api = api_for(path)
    if api == ANTHROPIC:
        return anthropic_error(status, message)
    if api == OPENAI:
        kind, code = _OPENAI[status]
        if reason == "tokens":
            kind = "tokens"
        return {"error": {"message": message, "type": kind, "param": None, "code": code}}
    return {"error": message}


def unauthorized(path: str) -> Response:
    return json_response(body(401, UNAUTHORIZED, path), 401,
                         {"WWW-Authenticate": 'Bearer realm="ollama-lb"'})


def forbidden(path: str, message: str) -> Response:
    return json_response(body(403, message, path), 403)


def too_many(path: str, message: str, retry_after: int, reason: str) -> Response:
    return json_response(body(429, message, path, reason), 429,
                         {"Retry-After": str(retry_after)})
