"""The model-routed Ollama endpoints and the facts the pipeline needs about each.

Ollama words its errors differently per endpoint (``model '' not found`` with 404 on generate,
``model is required`` with 400 on chat, double quotes on embed); the table keeps those facts in
one place, taken from the API reference (§3, §5.2).

Each endpoint also belongs to one API, whose shapes its errors take: the native API answers
``{"error": "..."}`` and streams NDJSON; OpenAI's (``/v1/chat/completions``, ``/v1/responses``
...) answers its error object and streams SSE; Anthropic's (``/v1/messages``) answers
``{"type": "error", "error": {...}}`` and streams named SSE events. A stream that breaks after
its first byte ends with one error frame in its own format (``stream_error_frame``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

NATIVE, OPENAI, ANTHROPIC = "native", "openai", "anthropic"


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one model-routed path behaves."""

    path: str
    stream_default: bool  # `stream` when the body does not say
    missing_model_404: bool  # True: 404 "model '' not found"; False: 400 "model is required"
    not_found_style: str  # "single": model 'x' not found; "pull": model "x" ... pulling it first
    api: str = NATIVE  # NATIVE, OPENAI or ANTHROPIC: the shape of its errors and streams
    named_events: bool = False  # its SSE stream names each event (`event: ...` lines)
    can_stream: bool = True
    name_fallback: bool = False  # accepts the old `name` field in place of `model`
    loads_model: bool = True  # a success means the node now has the model loaded
    unloads: bool = False  # empty prompt/messages with keep_alive 0 unloads (fan-out)

    @property
    def openai(self) -> bool:
        """OpenAI's error object and SSE streams (the older flag, kept for its callers)."""
        return self.api == OPENAI


_SINGLE, _PULL = "single", "pull"

ENDPOINTS: dict[str, Endpoint] = {
    e.path: e
    for e in (
        Endpoint("/api/generate", True, True, _SINGLE, unloads=True),
        Endpoint("/api/chat", True, False, _SINGLE, unloads=True),
        Endpoint("/api/embed", False, True, _PULL, can_stream=False),
        Endpoint("/api/embeddings", False, False, _PULL, can_stream=False),
        Endpoint("/api/show", False, False, _SINGLE, can_stream=False, name_fallback=True,
                 loads_model=False),
        Endpoint("/api/push", True, False, _SINGLE, name_fallback=True, loads_model=False),
        Endpoint("/v1/chat/completions", False, False, _SINGLE, api=OPENAI),
        Endpoint("/v1/completions", False, True, _SINGLE, api=OPENAI),
        Endpoint("/v1/embeddings", False, True, _PULL, api=OPENAI, can_stream=False),
        Endpoint("/v1/models", False, False, _SINGLE, api=OPENAI, can_stream=False,
                 loads_model=False),
        # both default to a complete reply (reference §2); a missing model is 400 on both
        Endpoint("/v1/responses", False, False, _SINGLE, api=OPENAI, named_events=True),
        Endpoint("/v1/messages", False, False, _SINGLE, api=ANTHROPIC, named_events=True),
    )
}
# The seed's alias: /v1/inference is generate.
ENDPOINTS["/v1/inference"] = ENDPOINTS["/api/generate"]


def endpoint_for(path: str) -> Endpoint | None:
    """The endpoint for a request path; ``/v1/models/<name>`` maps to the models entry."""
    ep = ENDPOINTS.get(path)
    if ep is None and path.startswith("/v1/models/"):
        return ENDPOINTS["/v1/models"]
    return ep


def api_for(path: str) -> str:
    """Whose error shapes a path answers in: its endpoint's API, else OpenAI's under /v1/.

    An alias answers in the shape of where it lives: the seed's ``/v1/inference`` (generate)
    has always answered errors in OpenAI's shape.
    """
    ep = endpoint_for(path)
    if ep is not None and path.startswith(ep.path):
        return ep.api
    return OPENAI if path.startswith("/v1/") else NATIVE


def not_found_message(endpoint: Endpoint, model: str) -> str:
    if endpoint.not_found_style == _PULL:
        return f'model "{model}" not found, try pulling it first'
    return f"model '{model}' not found"


_SEQUENCE = re.compile(rb'"sequence_number":\s*(\d+)')


def stream_error_frame(endpoint: Endpoint | None, message: str, last: bytes = b"") -> bytes:
    """The one frame that ends a stream broken after its first byte, in the stream's format.

    Native: an NDJSON line holding only ``error`` (what Ollama itself writes). OpenAI chat and
    completions: ``data: {"error": {...}}``, on which the OpenAI SDKs raise ``APIError``.
    Responses: an ``error`` event, the Responses API's own (``type``, ``code``, ``message``,
    ``param``, ``sequence_number`` after the last one relayed, found in ``last``), also
    carrying the error object so that the SDK raises rather than yield it among the deltas.
    Anthropic: ``event: error`` with ``{"type": "error", "error": {...}}``, as Anthropic's
    own streams end on an error.
    """
    api = endpoint.api if endpoint is not None else NATIVE
    if api == NATIVE:
        return json.dumps({"error": message}).encode() + b"\n"
    if api == ANTHROPIC:
        return _sse("error", {"type": "error",
                              "error": {"type": "api_error", "message": message}})
    error = {"message": message, "type": "api_error", "param": None, "code": None}
    if endpoint is None or not endpoint.named_events:
        return _sse(None, {"error": error})
    frame: dict[str, Any] = {"type": "error", "code": "api_error", "message": message,
                             "param": None}
    seen = _SEQUENCE.findall(last)
    if seen:
        frame["sequence_number"] = int(seen[-1]) + 1
    frame["error"] = error
    return _sse("error", frame)


def _sse(event: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {event}\n".encode() if event else b""
    return head + b"data: " + json.dumps(data).encode() + b"\n\n"
