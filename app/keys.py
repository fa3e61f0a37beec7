"""API keys: digests, fresh keys, lookup by digest, and model allow-lists.

Keys are random (``new_key``: 256 bits), so a SHA-256 digest is all a gateway needs to store:
nobody can search a 2^256 space, and a fast digest keeps the request path cheap (a slow
password hash exists for guessable secrets, which these are not). A presented key is hashed
once, looked up in a dict and the stored digest compared with ``hmac.compare_digest``.

A key's ``models`` are globs on the canonical model name (``pipeline.modelname.canonical``):
``llama3.2*`` means ``registry.ollama.ai/library/llama3.2*``, so it allows ``llama3.2``,
``llama3.2:1b`` and ``llama3.2-vision``, whatever spelling the client uses; ``*`` allows all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass

from pipeline.config import ApiKeyConfig
from pipeline.modelname import DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, canonical

KEY_PREFIX = "olb_"  # lets secret scanners (and people) recognise a leaked key
GLOB_CHARS = "*?["


def hash_key(key: str) -> str:
    """The ``hash`` value a config stores for ``key``: ``sha256:<64 hex digits>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def new_key() -> str:
    """A fresh key: 32 random bytes (256 bits), URL-safe base64, with a recognisable prefix."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def canonical_pattern(pattern: str) -> str:
    """A model glob in canonical form, filled in with Ollama's defaults as names are.

    Without a tag, a glob that ends in ``*`` already matches every tag; any other gets
    ``:latest``, as the plain name would.
    """
    p = pattern.strip().lower()
    if p == "*":
        return p
    if not any(c in p for c in GLOB_CHARS):
        return canonical(p)
    parts = p.split("/")
    if len(parts) == 1:
        parts = [DEFAULT_HOST, DEFAULT_NAMESPACE, *parts]
    elif len(parts) == 2:
        parts = [DEFAULT_HOST, *parts]
    if ":" not in parts[-1] and not parts[-1].endswith("*"):
        parts[-1] += ":" + DEFAULT_TAG
    return "/".join(parts)


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A configured key, ready for checks."""

    config: ApiKeyConfig
    scopes: frozenset[str]
    patterns: tuple[str, ...]  # canonical globs; empty: every model

    @property
    def name(self) -> str:
        return self.config.name

    def allows_model(self, raw: str) -> bool:
        if not self.patterns:
            return True
        name = canonical(raw) if raw else ""
        return bool(name) and any(p == "*" or fnmatch.fnmatchcase(name, p)
                                  for p in self.patterns)


class KeyRing:
    """The configured keys by digest; rebuilt on every config change (a reload)."""

    def __init__(self, keys: tuple[ApiKeyConfig, ...]) -> None:
        self.by_hash: dict[str, ApiKey] = {}
        self.by_name: dict[str, ApiKey] = {}
        for cfg in keys:
            key = ApiKey(cfg, frozenset(cfg.scopes),
                         tuple(canonical_pattern(m) for m in cfg.models))
            self.by_hash[cfg.hash] = key
            self.by_name[cfg.name] = key

    def __bool__(self) -> bool:
        return bool(self.by_hash)

    def lookup(self, presented: str) -> ApiKey | None:
        """The key whose digest is ``presented``'s, or None."""
        digest = hash_key(presented)
        key = self.by_hash.get(digest)
        if key is None or not hmac.compare_digest(key.config.hash, digest):
            return None
        return key
