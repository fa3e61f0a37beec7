"""Model names as an Ollama server reads them, written from the reference's rules.

The simulator keeps its own copy of these rules on purpose: the appliance has its own, and a
compatibility test that ran both through one implementation would check the code against
itself. A name is ``[host/][namespace/]model[:tag]`` with the defaults
``registry.ollama.ai``, ``library`` and ``latest``; matching ignores case; listings show the
shortest form that still carries the tag (``llama3.2:latest``, ``me/tiny:1b``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

HOST = "registry.ollama.ai"
NAMESPACE = "library"
TAG = "latest"

# One part: a letter, digit or underscore, then those plus "-" and "."; a host may also
# carry ":" (a port), a namespace may not carry "."; every part 1-80 long (a host 350).
_PART = {
    "host": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:-]{0,349}"),
    "namespace": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,79}"),
    "model": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
    "tag": re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,79}"),
}


@dataclass(frozen=True)
class Name:
    """The four parts of a model name, defaults filled in, case kept as written."""

    host: str
    namespace: str
    model: str
    tag: str

    @property
    def key(self) -> str:
        """What two names must share to name one model: every part, case folded."""
        return f"{self.host}/{self.namespace}/{self.model}:{self.tag}".lower()

    @property
    def short(self) -> str:
        """The form /api/tags lists: default host and namespace dropped, the tag kept."""
        if self.host.lower() != HOST:
            head = f"{self.host}/{self.namespace}/"
        elif self.namespace.lower() != NAMESPACE:
            head = f"{self.namespace}/"
        else:
            head = ""
        return f"{head}{self.model}:{self.tag}".lower()

    def valid(self) -> bool:
        return all(_PART[kind].fullmatch(getattr(self, kind) or "") is not None
                   for kind in _PART)


@lru_cache(maxsize=4096)
def parse(text: str) -> Name:
    """Split a name into its parts. A separator with nothing beside it leaves that part
    empty, which ``valid()`` rejects ("llama3.2:" or "/llama3.2")."""
    text = text.strip()
    tag = TAG
    colon, slash = text.rfind(":"), text.rfind("/")
    if colon > slash:  # a ":" before the last "/" belongs to a host's port
        text, tag = text[:colon], text[colon + 1:]
    parts = text.split("/")
    model = parts[-1]
    namespace = parts[-2] if len(parts) >= 2 else NAMESPACE
    host = "/".join(parts[:-2]) if len(parts) >= 3 else HOST  # extra "/" makes it invalid
    if "://" in host:
        host = host.split("://", 1)[1]
    return Name(host, namespace, model, tag)


def key(text: str) -> str:
    """The case-folded full name models are stored under; "" for an empty name."""
    return parse(text).key if text.strip() else ""


def short(text: str) -> str:
    return parse(text).short if text.strip() else ""


def namespace_of(text: str) -> str:
    """What OpenAI's ``owned_by`` reports for a model: its namespace."""
    return parse(text).namespace.lower()


def is_valid(text: str) -> bool:
    return bool(text.strip()) and parse(text).valid()
