"""The models a request names, for keys with a model allow-list.

The model of a model-routed call is in its JSON body, which the view reads afterwards. So the
body is read here once (bounded by ``server.maxBodyBytes``), and the environ's input replaced
by the same bytes, which the view then reads as if nothing happened. The model is read with
the pipeline's own ``inspect`` (off the hub for a large body), so the name checked is the name
routed. A body that cannot be parsed names no model: the pipeline refuses it with 400 without
any node seeing it. Only requests of keys that have an allow-list pay for this.
"""

from __future__ import annotations

import io
import json
from typing import Any

from pipeline.endpoints import endpoint_for
from pipeline.validation import BadRequest, inspect_off_hub

#: management endpoints and the body fields that name a model there
MANAGE_NAMES = {"manage.pull": ("model", "name"), "manage.delete": ("model", "name"),
                "manage.create": ("model", "name", "from"),
                "manage.copy": ("source", "destination")}
NOT_A_NAME = "(not a string)"
FACTS_KEY = "ollama_lb.facts"  # environ: the body's Facts, when the gate had to parse it
BODY_KEY = "ollama_lb.buffered_body"  # environ: the body, when the gate read it (in the limit)


def buffer_body(environ: dict[str, Any], limit: int, reread: bool = True) -> bytes | None:
    """The body, with the environ's input replaced by it; None if over the limit (the view
    answers 413 as it always does). Within the limit it is also left as is under
    ``BODY_KEY``, so that a model-routed view takes it without reading it again; ``reread``
    False: the input is not replaced, as no view will read it (a model-routed one)."""
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > limit:
        return None
    body = environ["wsgi.input"].read(limit + 1)
    if reread or len(body) > limit:  # for a view that reads the input (management, a 413)
        environ["wsgi.input"] = io.BytesIO(body)
    size = len(body)
    environ["CONTENT_LENGTH"] = str(size)
    environ.pop("HTTP_TRANSFER_ENCODING", None)  # the bytes are all here now
    if size > limit:
        return None
    environ[BODY_KEY] = body
    return body


def models_named(endpoint: str, rule: str, view_args: dict[str, Any] | None,
                 environ: dict[str, Any], limit: int) -> list[str]:
    """Every model the request would use; [] when it names none (or cannot be read)."""
    if endpoint == "ollama.openai_model":
        return [str((view_args or {}).get("name", ""))]
    fields = MANAGE_NAMES.get(endpoint)
    ep = endpoint_for(rule) if fields is None and endpoint.startswith("ollama./") else None
    if fields is None and ep is None:
        return []
    body = buffer_body(environ, limit, reread=ep is None)
    if body is None:
        return []
    if ep is not None:
        try:
            facts = inspect_off_hub(ep, body)
        except BadRequest:
            return []
        environ[FACTS_KEY] = facts  # parsed once: the view hands them to the pipeline
        return [facts.model_raw] if facts.model_raw else []
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        return []
    if not isinstance(data, dict):
        return []
    names = [data[f] for f in fields if f in data and data[f] not in ("", None)]
    return [n if isinstance(n, str) else NOT_A_NAME for n in names]
