"""API keys: digests, fresh keys, lookup by digest, and model allow-lists.

Keys are random (``new_key``: 256 bits), so a SHA-256 digest is all a gateway needs to store:
nobody can search a 2^256 space, and a fast digest keeps the request path cheap (a slow
password hash exists for guessable secrets, which these are not). A presented key is hashed
once, looked up in a dict and the stored digest compared with ``hmac.compare_digest``.

A client sends the same header on every request, so the ring remembers, per distinct header
value that named a valid key, which key it named (``MAX_REMEMBERED`` values, forgotten all at
once when full; an unknown key is never remembered, so guessing fills nothing). The ring is
rebuilt on every change of the keys, so a removed or re-hashed key is forgotten with it. A
remembered value is found by the dict's hash (SipHash, keyed per process) before any byte of
it is compared, so its lookup tells a guesser nothing a digest lookup would not.

A key's ``models`` are globs on the canonical model name (``pipeline.modelname.canonical``):
``llama3.2*`` means ``registry.ollama.ai/library/llama3.2*``, so it allows ``llama3.2``,
``llama3.2:1b`` and ``llama3.2-vision``, whatever spelling the client uses; ``*`` allows all.
"""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from pipeline.config import ApiKeyConfig
from pipeline.modelname import DEFAULT_HOST, DEFAULT_NAMESPACE, DEFAULT_TAG, canonical

KEY_PREFIX = "olb_"  # lets secret scanners (and people) recognise a leaked key
GLOB_CHARS = "*?["
MAX_REMEMBERED = 64  # distinct credential header values whose key the ring remembers
MAX_MODELS_REMEMBERED = 256  # per key: model names whose allow-list verdict it remembers


def hash_key(key: str) -> str:
    """The ``hash`` value a config stores for ``key``: ``sha256:<64 hex digits>``."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


def bearer(header: str) -> str | None:
    """The key of an ``Authorization`` header: a Bearer token, else None."""
    scheme, _, value = header.strip().partition(" ")
    return (value.strip() or None) if scheme.lower() == "bearer" else None


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
    name: str  # the config's: a field, read on every request, not a property
    #: raw model name -> verdict: a client names the same few models again and again
    verdicts: dict[str, bool] = field(default_factory=dict, compare=False, repr=False)

    def allows_model(self, raw: str) -> bool:
        verdict = self.verdicts.get(raw)
        if verdict is None:
            verdict = self._judge(raw)
            if len(self.verdicts) >= MAX_MODELS_REMEMBERED:
                self.verdicts.clear()
            self.verdicts[raw] = verdict
        return verdict

    def _judge(self, raw: str) -> bool:
        if not self.patterns:
            return True
        name = canonical(raw) if raw else ""
        return bool(name) and any(p == "*" or fnmatch.fnmatchcase(name, p)
                                  for p in self.patterns)


class KeyRing:
    """The configured keys by digest; rebuilt on every change of the keys (a reload)."""

    def __init__(self, keys: tuple[ApiKeyConfig, ...]) -> None:
        self.by_hash: dict[str, ApiKey] = {}
        self.by_name: dict[str, ApiKey] = {}
        #: credential header values that named a valid key: Authorization (read by the gate
        #: before it calls ``presented``, a call less per request), x-api-key
        self.bearers: dict[str, ApiKey] = {}
        self._api_keys: dict[str, ApiKey] = {}
        for cfg in keys:
            key = ApiKey(cfg, frozenset(cfg.scopes),
                         tuple(canonical_pattern(m) for m in cfg.models), cfg.name)
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

    def presented(self, authorization: str | None, api_key: str | None) -> ApiKey | None:
        """The key a request's ``Authorization`` header names (a Bearer token), else its
        ``x-api-key`` header; None if neither names a configured key. The gate looks an
        ``Authorization`` header up in ``bearers`` first: this is for one not found there."""
        if authorization is not None:
            return self._remember(self.bearers, authorization, bearer(authorization))
        if not api_key:
            return None
        key = self._api_keys.get(api_key)
        return key if key is not None else self._remember(self._api_keys, api_key, api_key)

    def _remember(self, seen: dict[str, ApiKey], header: str, given: str | None
                  ) -> ApiKey | None:
        key = self.lookup(given) if given else None
        if key is not None:
            if len(seen) >= MAX_REMEMBERED:
                seen.clear()
            seen[header] = key
        return key
