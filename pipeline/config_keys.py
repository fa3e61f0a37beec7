"""How a config key is declared: ``setting(default, validator, ...)`` and the validators.

One place for the declaration helpers, so each section module (``config.py``,
``config_security.py``, ``config_models.py``, ``config_shared.py``) declares its keys the same
way: the default, the check and the restart flag written once, in the dataclass field.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import MISSING, field
from typing import Any
from urllib.parse import urlsplit

from marshmallow import ValidationError, validate

# --- validators --------------------------------------------------------------------------------

POSITIVE = validate.Range(min=1)
NON_NEGATIVE = validate.Range(min=0)
AT_LEAST_ONE = validate.Range(min=1.0)  # for floats: the message says 1.0
NOT_EMPTY = validate.Length(min=1)
PORT = validate.Range(min=0, max=65535)
METRIC_NAME = validate.Regexp(r"^[a-zA-Z_][a-zA-Z0-9_]*$", error="must be a metric name")


def _power_of_two(value: int) -> None:
    if value < 1 or value & (value - 1):
        raise ValidationError(f"must be a power of two (1024, 2048, ...), got {value}")


def _http_url(value: str) -> None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError(f"must be an http:// or https:// URL with a host, got {value!r}")
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ValidationError(f"bad port in {value!r}") from exc


def _ip_network(value: str) -> None:
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValidationError(f"must be an IP address or network (10.0.0.0/8), got {value!r}"
                              ) from None


def _strip_slash(value: Any) -> Any:
    """``http://h:1/`` and ``http://h:1`` are one node; anything else is left to the check."""
    return value.rstrip("/") if isinstance(value, str) else value


def setting(default: Any = MISSING, validator: Callable[[Any], Any] | None = None, *,
            items: Callable[[Any], Any] | None = None, restart: bool = False,
            clean: Callable[[Any], Any] | None = None) -> Any:
    """A config key: its default, its validator, and whether only a restart applies it.

    ``items`` validates each element of a list key; ``clean`` normalises the raw value before
    it is checked. No default makes the key required.
    """
    meta = {"validate": validator, "items": items, "restart": restart, "clean": clean}
    return field(default=default, metadata={k: v for k, v in meta.items() if v})
