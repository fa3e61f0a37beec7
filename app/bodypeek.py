"""The models a request names, for keys with a model allow-list.

The model of a model-routed call is in its JSON body, which the view reads afterwards. So the
body is read here once (bounded by ``server.maxBodyBytes``) and handed to the view, or for a
management view the environ's input replaced by the same bytes, which the view then reads as
if nothing happened. The model is read with
the pipeline's own ``inspect`` (off the hub for a large body), so the name checked is the name
routed. A body that cannot be parsed names no model: the pipeline refuses it with 400 without
any node seeing it. Only requests of keys that have an allow-list pay for this.
"""

from __future__ import annotations

import io
import json
from typing import Any

from pipeline.endpoints import Endpoint, endpoint_for
from pipeline.validation import OFF_HUB_BYTES, BadRequest, inspect, inspect_off_hub

#: management endpoints and the body fields that name a model there
MANAGE_NAMES = {"manage.pull": ("model", "name"), "manage.delete": ("model", "name"),
                "manage.create": ("model", "name", "from"),
                "manage.copy": ("source", "destination")}
NOT_A_NAME = "(not a string)"
FACTS_KEY = "ollama_lb.facts"  # environ: the body's Facts, when the gate had to parse it
BODY_KEY = "ollama_lb.buffered_body"  # environ: the body, when the gate read it (in the limit)


def _read_bounded(environ: dict[str, Any], limit: int) -> bytes | None:
    """Up to ``limit`` + 1 bytes of the body (one more tells it is over); None, with nothing
    read, when its ``Content-Length`` already says it is over."""
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > limit:
        return None
    return environ["wsgi.input"].read(limit + 1)


def buffer_body(environ: dict[str, Any], limit: int) -> bytes | None:
    """The body, with the environ's input replaced by it, for a view that reads the input (a
    management view); None if over the limit (the view answers 413 as it always does)."""
    body = _read_bounded(environ, limit)
    if body is None:
        return None
    environ["wsgi.input"] = io.BytesIO(body)
    size = len(body)
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # the bytes are all here now
    return body if size <= limit else None


def routed_model(ep: Endpoint, environ: dict[str, Any], limit: int) -> str | None:
    """The model a model-routed call names; None when it names none or cannot be read.

    Its body is read once and left under ``BODY_KEY``, its facts under ``FACTS_KEY``: the
    view takes both and reads and parses nothing again, so the input is not replaced. Over
    the limit, the input is replaced by what was read, and the view answers 413."""
    body = _read_bounded(environ, limit)
    if body is None:
        return None
    if len(body) > limit:
        environ["wsgi.input"] = io.BytesIO(body)
        return None
    environ[BODY_KEY] = body
    try:
        facts = inspect(ep, body) if len(body) < OFF_HUB_BYTES else inspect_off_hub(ep, body)
    except BadRequest:
        return None
    environ[FACTS_KEY] = facts  # parsed once: the view hands them to the pipeline
    return facts.model_raw or None


def models_named(endpoint: str, rule: str, view_args: dict[str, Any] | None,
                 environ: dict[str, Any], limit: int) -> list[str]:
    """Every model the request would use; [] when it names none (or cannot be read)."""
    if endpoint == "ollama.openai_model":
        return [str((view_args or {}).get("name", ""))]
    fields = MANAGE_NAMES.get(endpoint)
    if fields is None:
        ep = endpoint_for(rule) if endpoint.startswith("ollama./") else None
        name = routed_model(ep, environ, limit) if ep is not None else None
        return [name] if name else []
    body = buffer_body(environ, limit)
    if body is None:
        return []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    names = [data[f] for f in fields if f in data and data[f] not in ("", None)]
    return [n if isinstance(n, str) else NOT_A_NAME for n in names]
