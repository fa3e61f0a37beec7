"""Ollama model names and their canonical form.

``llama3.2``, ``llama3.2:latest`` and ``registry.ollama.ai/library/llama3.2:latest`` name one
model; matching ignores case. Routing compares canonical forms, replies echo the client's string.
"""

from __future__ import annotations

from functools import lru_cache

DEFAULT_HOST = "registry.ollama.ai"
DEFAULT_NAMESPACE = "library"
DEFAULT_TAG = "latest"


@lru_cache(maxsize=4096)
def canonical(name: str) -> str:
    """Return ``host/namespace/model:tag`` in lower case, filling in Ollama's defaults."""
    name = name.strip().lower()
    if not name:
        return ""
    tag = DEFAULT_TAG
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        base, tag = name.rsplit(":", 1)
    else:
        base = name
    parts = base.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, parts[0]]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    return "/".join(parts) + ":" + tag


def display(name: str) -> str:
    """The short form Ollama lists in /api/tags: defaults dropped, tag kept."""
    full = canonical(name)
    if not full:
        return ""
    prefix = f"{DEFAULT_HOST}/{DEFAULT_NAMESPACE}/"
    if full.startswith(prefix):
        return full[len(prefix) :]
    if full.startswith(DEFAULT_HOST + "/"):
        return full[len(DEFAULT_HOST) + 1 :]
    return full


def namespace(name: str) -> str:
    """The namespace part, which OpenAI's ``owned_by`` reports."""
    full = canonical(name)
    parts = full.split("/")
    return parts[1] if len(parts) >= 3 else DEFAULT_NAMESPACE
