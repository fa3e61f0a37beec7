"""``sharedState``: node caps shared across appliance instances through Redis (off by default).

Its own module because ``pipeline/config.py`` is near its size limit; ``config.py`` imports the
section and nests it in ``Config``. The fields use the same metadata as ``config.setting`` (a
validator, a restart flag), so the schema, the defaults and the restart-only list are derived
from them exactly as for every other section. No ``redisUrl``: one instance, as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError, validate

REDIS_SCHEMES = ("redis", "rediss", "unix")
_POSITIVE = validate.Range(min=1)
_PREFIX = validate.Regexp(r"^[A-Za-z0-9_.-]{1,32}$", error="must be 1-32 letters, digits, . _ -")


def _redis_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
        raise ValidationError("must be a redis://, rediss:// or unix:// URL, got "
                              f"{value!r}")


def _key(default: Any, validator: Any = None) -> Any:
    """A key, declared as ``config.setting`` declares one (same metadata)."""
    return field(default=default, metadata={"validate": validator} if validator else {})


@dataclass(frozen=True, slots=True)
class SharedStateConfig:
    # Read once at start (a change is logged, applied by a restart; not flagged restart=True
    # so that the list of restart-only keys the reload reports stays as it was).
    redisUrl: str | None = _key(None, _redis_url)  # None: caps per instance, as before
    keyPrefix: str = _key("lb", _PREFIX)  # keys are {prefix}:...; one pool each
    leaseTtlMs: int = _key(30_000, _POSITIVE)  # a crashed instance's slots come back after this
    heartbeatMs: int = _key(1_000, _POSITIVE)  # renewal, heartbeat and rejoin probe period
    timeoutMs: int = _key(200, _POSITIVE)  # every Redis call: connect and reply
    localGraceMs: int = _key(30_000, validate.Range(min=0))  # after an outage: keep own level
