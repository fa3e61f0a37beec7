"""HTTP plumbing shared by every API of the simulated node: one call, replies, errors, values.

Each API answers errors in its own shape (native ``{"error": ...}``, OpenAI's nested object,
Anthropic's typed error); a handler raises ``HTTPError`` and the route's shape renders it.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

StartResponse = Callable[..., Any]
Reply = Iterable[bytes]
ErrorShape = Callable[[int, str], dict[str, Any]]
JSON = "application/json; charset=utf-8"
NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
BUSY = "server busy, please try again.  maximum pending requests exceeded"
STATUS_TEXT = {200: "OK", 201: "Created", 400: "Bad Request", 403: "Forbidden",
               404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error",
               503: "Service Unavailable"}


class HTTPError(Exception):
    """An error answered before the reply starts, with the route's error shape."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Call:
    """One request as a handler sees it: the environ, the reply callable, the JSON body."""

    environ: dict[str, Any]
    start_response: StartResponse
    body: dict[str, Any]

    @property
    def method(self) -> str:
        return str(self.environ["REQUEST_METHOD"])

    @property
    def path(self) -> str:
        return str(self.environ.get("PATH_INFO", "/"))

    @property
    def fault(self) -> str:
        """The fault the fault layer chose for this request ("none" when healthy)."""
        return str(self.environ.get("ollama_lb.fault", "none"))

    @property
    def socket(self) -> Any:
        return self.environ.get("ollama_lb.socket")

    def stream(self) -> bool:
        """Native default: a reply streams unless the body says ``"stream": false``."""
        return self.body.get("stream", True) is not False


# --- replies ------------------------------------------------------------------------------------

def raw(sr: StartResponse, status: int, ctype: str, body: bytes) -> list[bytes]:
    sr(f"{status} {STATUS_TEXT.get(status, 'Error')}",
       [("Content-Type", ctype), ("Content-Length", str(len(body)))])
    return [body]


def json_reply(sr: StartResponse, status: int, obj: Any) -> list[bytes]:
    return raw(sr, status, JSON, json.dumps(obj).encode())


def text(sr: StartResponse, status: int, body: str) -> list[bytes]:
    return raw(sr, status, "text/plain; charset=utf-8", body.encode())


def empty(sr: StartResponse, status: int = 200) -> list[bytes]:
    """Copy and delete answer 200 with an empty body (and the JSON content type)."""
    return raw(sr, status, JSON, b"")


def ndjson_line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def sse_data(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj).encode() + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """A named SSE event, as /v1/responses and /v1/messages send them."""
    return f"event: {name}\ndata: ".encode() + json.dumps(obj).encode() + b"\n\n"


# --- error shapes -------------------------------------------------------------------------------

def native_error(status: int, message: str) -> dict[str, Any]:
    return {"error": message}


def openai_error(status: int, message: str) -> dict[str, Any]:
    kind = {400: "invalid_request_error", 404: "not_found_error"}.get(status, "api_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": None}}


_ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                    403: "permission_error", 404: "not_found_error", 429: "rate_limit_error",
                    503: "overloaded_error", 529: "overloaded_error"}


def anthropic_error(status: int, message: str) -> dict[str, Any]:
    return {"type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, "api_error"), "message": message},
            "request_id": "req_" + secrets.token_hex(12)}


# --- request bodies -----------------------------------------------------------------------------

def read_body(environ: dict[str, Any]) -> bytes:
    stream = environ["wsgi.input"]
    length = int(environ.get("CONTENT_LENGTH") or 0)
    return stream.read(length) if length else stream.read()


def read_json(environ: dict[str, Any]) -> dict[str, Any]:
    """Decode the body as JSON whatever the Content-Type, as Ollama does."""
    data = read_body(environ)
    environ["ollama_lb.body"] = data
    if not data.strip():
        raise HTTPError(400, "missing request body")
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise HTTPError(400, f"invalid character looking for beginning of value: {exc}"
                        ) from None
    if not isinstance(obj, dict):
        raise HTTPError(400, "json: cannot unmarshal array into Go value of type api.Request")
    return obj


# --- values -------------------------------------------------------------------------------------

def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def local_time(ts: float) -> str:
    return datetime.fromtimestamp(ts).astimezone().isoformat()


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}


def parse_keep_alive(value: Any) -> float | None:
    """Seconds from a JSON number or a Go duration string; None when absent."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise HTTPError(400, "json: cannot unmarshal bool into Go value of type api.Duration")
    if isinstance(value, int | float):
        return float(value)
    txt = str(value).strip()
    if txt in ("0", "-0"):
        return 0.0
    parts = _DURATION.findall(txt)
    if not parts or "".join(n + u for n, u in parts) != txt.replace("+", ""):
        if re.fullmatch(r"-?\d+(\.\d+)?", txt):
            raise HTTPError(400, f'time: missing unit in duration "{txt}"')
        raise HTTPError(400, f'time: invalid duration "{txt}"')
    sign = -1 if txt.startswith("-") else 1
    return sign * sum(abs(float(n)) * _UNIT[u] for n, u in parts)
