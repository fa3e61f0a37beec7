"""The one place pipeline error codes become HTTP statuses and Ollama-shaped bodies.

Native paths answer ``{"error": "..."}``; ``/v1`` paths answer OpenAI's error object with the
same status (API reference §5.3). Shedding answers carry ``Retry-After``.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Response

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


def error_body(status: int, message: str, path: str) -> dict[str, Any]:
    if path.startswith("/v1/"):
        return openai_error(status, message)
    return {"error": message}


def json_response(obj: Any, status: int = 200, headers: dict[str, str] | None = None
                  ) -> Response:
    return Response(json.dumps(obj), status=status, content_type=JSON_TYPE, headers=headers)


def error_response(err: PipelineError, path: str) -> Response:
    status = status_for(err.code)
    headers = {}
    if err.retry_after is not None:
        headers["Retry-After"] = str(max(1, round(err.retry_after)))
    return json_response(error_body(status, err.message, path), status, headers)


def plain(status: int, text: str) -> Response:
    """Gin's own plain-text replies (unknown path, wrong method)."""
    return Response(text, status=status, content_type="text/plain")
