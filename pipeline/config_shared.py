"""``sharedState``: node caps shared across appliance instances through Redis (off by default).

Its own module because ``pipeline/config.py`` is near its size limit; ``config.py`` imports the
section and nests it in ``Config``. The fields use the same metadata as ``config.setting`` (a
validator, a restart flag), so the schema, the defaults and the restart-only list are derived
from them exactly as for every other section. No ``redisUrl``: one instance, as before.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from marshmallow import ValidationError, validate

REDIS_SCHEMES = ("redis", "rediss", "unix")
SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379
SENTINEL_OPTIONS = ("sentinel_username", "sentinel_password")
_POSITIVE = validate.Range(min=1)
_PREFIX = validate.Regexp(r"^[A-Za-z0-9_.-]{1,32}$", error="must be 1-32 letters, digits, . _ -")
_HOST = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """``redis+sentinel://[user:password@]host[:port][,host2[:port2]...]/MASTER[/DB]``.

    The form Prefect/docket and Redis-Sentinel-Url give redis-py users (redis-py itself has
    no URL for a Sentinel topology): the members default to port 26379; the user and password
    are the data nodes' (``requirepass``/ACL), ``?sentinel_username=&sentinel_password=``
    the Sentinel daemons' own, if they have one.
    """

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None


def _member(text: str) -> tuple[str, int]:
    host, _, port = text.partition(":")
    if not _HOST.match(host):
        raise ValidationError(f"sentinel member {text!r}: a host name or IPv4 address, "
                              "then an optional :port")
    if not port:
        return host, SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValidationError(f"sentinel member {text!r}: the port must be 1-65535")
    return host, int(port)


def _options(query: str) -> dict[str, str]:
    opts = parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    unknown = sorted(set(opts) - set(SENTINEL_OPTIONS))
    if unknown:
        raise ValidationError(f"unknown option(s) {', '.join(unknown)}; a Sentinel URL takes "
                              f"only {' and '.join(SENTINEL_OPTIONS)}")
    return {k: v[-1] for k, v in opts.items()}


def parse_sentinel_url(value: str) -> SentinelUrl:
    """The parts of a ``redis+sentinel://`` URL; ValidationError says what is wrong."""
    scheme, rest = value.split("://", 1) if "://" in value else ("", value)
    if scheme.lower() != SENTINEL_SCHEME:
        raise ValidationError(f"not a {SENTINEL_SCHEME}:// URL: {value!r}")
    rest, _, query = rest.partition("?")
    creds, _, rest = rest.rpartition("@")
    hosts, _, path = rest.partition("/")
    members = tuple(_member(m) for m in hosts.split(",")) if hosts else ()
    if not members:
        raise ValidationError("a Sentinel URL needs at least one sentinel host[:port]")
    names = [unquote(p) for p in path.split("/")] if path else []
    if not names or not names[0] or len(names) > 2:
        raise ValidationError("a Sentinel URL ends in /MASTERNAME or /MASTERNAME/DB "
                              "(the name the sentinels monitor)")
    if len(names) == 2 and not names[1].isdigit():
        raise ValidationError(f"the database after the master name must be a number, "
                              f"got {names[1]!r}")
    user, colon, password = creds.partition(":")
    opts = _options(query)
    return SentinelUrl(members, names[0], int(names[1]) if len(names) == 2 else 0,
                       unquote(user) or None, unquote(password) if colon else None,
                       opts.get("sentinel_username") or None,
                       opts.get("sentinel_password") or None)


def is_sentinel(url: str) -> bool:
    return url.lower().startswith(SENTINEL_SCHEME + "://")


def _redis_url(value: str) -> None:
    if is_sentinel(value):
        parse_sentinel_url(value)
        return
    parts = urlsplit(value)
    if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
        raise ValidationError("must be a redis://, rediss://, unix:// or "
                              f"redis+sentinel://host[:port][,...]/MASTER[/DB] URL, got "
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
