"""The ``security`` section (API keys, client limits) and ``server.tls``, declared once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError, validate

from pipeline.config_keys import NOT_EMPTY, POSITIVE, setting

SCOPES = ("inference", "manage", "admin")  # what an API key may do (see app/auth.py)

def _sha256_digest(value: str) -> None:
    if not re.fullmatch(r"sha256:[0-9a-f]{64}", value):
        raise ValidationError("must be 'sha256:' and 64 hex digits, as `ollama-lb hash-key KEY` "
                              "prints it")


def _lower(value: Any) -> Any:
    return value.strip().lower() if isinstance(value, str) else value


def _unique_keys(keys: list[Any]) -> None:
    """Two entries with one name would share usage and limits; one hash, two names: which?"""
    for attr in ("name", "hash"):
        seen = [getattr(k, attr) for k in keys]
        dupes = sorted({v for v in seen if seen.count(v) > 1})
        if dupes:
            shown = ", ".join(dupes) if attr == "name" else f"{len(dupes)} hash(es)"
            raise ValidationError(f"duplicate API key {attr}(s): {shown}")


KEY_NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                           error="must be 1-64 letters, digits, '.', '_' or '-'")



@dataclass(frozen=True, slots=True)
class TlsConfig:
    """``server.tls``: HTTPS when certFile and keyFile are set; files reloaded on change."""

    certFile: str | None = setting(None)  # PEM: the certificate, then its chain
    keyFile: str | None = setting(None)  # PEM, unencrypted; readable by the service only
    clientCaFile: str | None = setting(None)  # mutual TLS: client certificates from these CAs

    def __post_init__(self) -> None:
        if bool(self.certFile) != bool(self.keyFile):
            raise ValidationError("certFile and keyFile are set together or not at all")
        if self.clientCaFile and not self.certFile:
            raise ValidationError("clientCaFile needs certFile and keyFile (mutual TLS is TLS)")


@dataclass(frozen=True, slots=True)
class ApiKeyConfig:
    """One API key: only its SHA-256 digest is stored (keys are random: no slow hash needed)."""

    name: str = setting(validator=KEY_NAME)  # in logs, metrics and /admin/usage
    hash: str = setting(validator=_sha256_digest, clean=_lower)
    scopes: tuple[str, ...] = setting(("inference",), validate.Length(min=1),
                                      items=validate.OneOf(SCOPES))
    models: tuple[str, ...] = setting((), items=NOT_EMPTY)  # globs; empty: every model
    requestsPerMinute: int | None = setting(None, POSITIVE)
    maxConcurrent: int | None = setting(None, POSITIVE)
    tokensPerDay: int | None = setting(None, POSITIVE)  # prompt + completion, UTC day


@dataclass(frozen=True, slots=True)
class ClientLimitsConfig:
    """Limits per client IP address, applied while no API keys are configured."""

    requestsPerMinute: int | None = setting(None, POSITIVE)
    maxConcurrent: int | None = setting(None, POSITIVE)
    tokensPerDay: int | None = setting(None, POSITIVE)


@dataclass(frozen=True, slots=True)
class SecurityConfig:
    apiKeys: tuple[ApiKeyConfig, ...] = setting((), _unique_keys)
    openManagement: bool = setting(False)  # without keys: manage endpoints beyond loopback?
    clientLimits: ClientLimitsConfig = setting(ClientLimitsConfig())  # noqa: RUF009 - frozen
    usageFile: str | None = setting(None, restart=True)  # SQLite; relative: $STATE_DIRECTORY
