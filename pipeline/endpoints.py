"""The model-routed Ollama endpoints and the facts the pipeline needs about each.

Ollama words its errors differently per endpoint (``model '' not found`` with 404 on generate,
``model is required`` with 400 on chat, double quotes on embed); the table keeps those facts in
one place, taken from the API reference (§3, §5.2).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """How one model-routed path behaves."""

    path: str
    stream_default: bool  # `stream` when the body does not say
    missing_model_404: bool  # True: 404 "model '' not found"; False: 400 "model is required"
    not_found_style: str  # "single": model 'x' not found; "pull": model "x" ... pulling it first
    openai: bool = False  # /v1: OpenAI error shapes and SSE streams
    can_stream: bool = True
    name_fallback: bool = False  # accepts the old `name` field in place of `model`
    loads_model: bool = True  # a success means the node now has the model loaded
    unloads: bool = False  # empty prompt/messages with keep_alive 0 unloads (fan-out)


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
        Endpoint("/v1/chat/completions", False, False, _SINGLE, openai=True),
        Endpoint("/v1/completions", False, True, _SINGLE, openai=True),
        Endpoint("/v1/embeddings", False, True, _PULL, openai=True, can_stream=False),
        Endpoint("/v1/models", False, False, _SINGLE, openai=True, can_stream=False,
                 loads_model=False),
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


def not_found_message(endpoint: Endpoint, model: str) -> str:
    if endpoint.not_found_style == _PULL:
        return f'model "{model}" not found, try pulling it first'
    return f"model '{model}' not found"
