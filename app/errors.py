"""The one place pipeline error codes become HTTP statuses and Ollama-shaped bodies.

Native paths answer ``{"error": "..."}``; ``/v1`` paths answer OpenAI's error object with the
same status (API reference §5.3), except Anthropic's ``/v1/messages``, which answers
Anthropic's (``{"type": "error", "error": {"type": ..., "message": ...}}``). Which API a path
belongs to is the endpoint table's fact (``pipeline.endpoints.api_for``). Shedding answers carry
``Retry-After``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from flask import Response
from werkzeug.exceptions import HTTPException

from pipeline.endpoints import ANTHROPIC, OPENAI, api_for
from pipeline.errors import ErrorCode, PipelineError

STATUS: dict[ErrorCode, int] = {
    ErrorCode.INVALID_REQUEST: 400,
    ErrorCode.VALIDATION: 400,
    ErrorCode.MODEL_REQUIRED: 400,
    ErrorCode.MODEL_NOT_FOUND: 404,
    ErrorCode.NO_AVAILABLE_NODE: 503,
    ErrorCode.BACKPRESSURE: 503,
    ErrorCode.TIMEOUT: 504,
    ErrorCode.UPSTREAM: 502,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.SHUTTING_DOWN: 503,
    ErrorCode.CANCELLED: 499,  # nginx's "client closed request": nobody reads it
    ErrorCode.INTERNAL: 500,
}

JSON_TYPE = "application/json; charset=utf-8"


def status_for(code: ErrorCode) -> int:
    return STATUS.get(code, 500)


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


#: Anthropic's error types by status (its API reference, "HTTP errors"); other 4xx are
#: invalid requests, other 5xx api errors. The appliance's 503 (shedding, no node) is Anthropic's
#: overload, which its SDK retries.
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                   403: "permission_error", 404: "not_found_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str, request_id: str | None = None
                    ) -> dict[str, Any]:
    """Anthropic's error body; ``request_id`` (Anthropic and Ollama send one) when known."""
    kind = ANTHROPIC_TYPES.get(status, "invalid_request_error" if status < 500 else "api_error")
    body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    if request_id:
        body["request_id"] = request_id
    return body


def error_body(status: int, message: str, path: str, request_id: str | None = None
               ) -> dict[str, Any]:
    """The error body in the shape of the API the path belongs to."""
    api = api_for(path)
    if api == OPENAI:
        return openai_error(status, message)
    if api == ANTHROPIC:
        return anthropic_error(status, message, request_id)
    return {"error": message}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(json.dumps(obj), status=status, content_type=JSON_TYPE, headers=headers)


def error_response(err: PipelineError, path: str, request_id: str | None = None) -> Response:
    status = status_for(err.code)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return json_response(error_body(status, err.message, path, request_id), status, headers)


def plain(status: int, text: str) -> Response:
    """Gin's own plain-text replies (unknown path, wrong method)."""
    return Response(text, status=status, content_type="text/plain")


def http_error_response(exc: HTTPException, path: str) -> Response:
    """An HTTP error raised on the way (a body too slow, a bad header): Gin's plain 404/405,
    else the API's error shape."""
    if exc.code == 404:
        return plain(404, "404 page not found")
    if exc.code == 405:
        return plain(405, "405 method not allowed")
    status = exc.code or 500
    return json_response(error_body(status, exc.description or exc.name, path), status)


def unhandled_error_response(exc: Exception, path: str) -> Response:
    """A bug on the way to an answer: logged with its traceback, a 500 in the API's shape."""
    logging.getLogger("ollama_lb.http").exception("unhandled error", extra={
        "event": "http_error", "path": path})
    return json_response(error_body(500, f"internal error: {exc}", path), 500)
