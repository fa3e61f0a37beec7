"""The appliance configuration: YAML in, validated, frozen objects out.

The file format keeps every key of the original Java project's ``config.yaml`` (camelCase, same
sections, same defaults) and adds a few keys of its own, each documented in the README. Unknown
keys are errors, never silently ignored: a typo in a production config must not pass unnoticed.

Each key is declared once, as a field of a frozen dataclass made with ``setting()``: its
default, its validator and whether only a restart can apply it. The marshmallow schemas that
check a file are derived from those fields, and so is the list of restart-only keys, so a
default or a restart flag can never say one thing in the schema and another in the object.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from functools import cache
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints
from urllib.parse import urlsplit

import yaml
from marshmallow import RAISE, Schema, ValidationError, post_load, pre_load, validate
from marshmallow import fields as f

STRATEGIES = ("round-robin", "weighted-round-robin", "least-in-flight", "random", "model-aware")
WAIT_STRATEGIES = ("blocking", "sleeping", "yielding", "busy-spin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
SCOPES = ("inference", "manage", "admin")  # what an API key may do (see app/auth.py)


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists ``key.path: message`` lines."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


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


# --- the config, one frozen dataclass per section ----------------------------------------------

@dataclass(frozen=True, slots=True)
class ServerConfig:
    port: int = setting(8080, PORT, restart=True)
    host: str = setting("0.0.0.0", restart=True)
    backlog: int = setting(1024, POSITIVE, restart=True)
    maxBodyBytes: int = setting(64 * 1024 * 1024, POSITIVE)  # base64 images: tens of MB
    drainSeconds: float = setting(30.0, NON_NEGATIVE)  # how long SIGTERM waits for streams
    allowedOrigins: tuple[str, ...] = setting((), items=NOT_EMPTY)  # CORS, like OLLAMA_ORIGINS
    writeTimeoutMs: int = setting(30_000, POSITIVE)  # a client taking nothing this long is cut
    keepAliveTimeoutMs: int = setting(75_000, POSITIVE)  # idle kept-alive client connections
    maxBlobBytes: int = setting(1024 ** 4, POSITIVE)  # POST /api/blobs: streamed, never held
    # peers whose X-Forwarded-For / Forwarded headers are believed (addresses or networks)
    trustedProxies: tuple[str, ...] = setting((), items=_ip_network)


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: str = setting(validator=NOT_EMPTY)
    url: str = setting(validator=_http_url, clean=_strip_slash)
    models: tuple[str, ...] = setting((), items=NOT_EMPTY)
    maxConcurrentRequests: int = setting(4, POSITIVE)
    weight: int = setting(1, POSITIVE)
    enabled: bool = setting(True)
    healthCheck: bool | None = setting(None)  # None: follow healthCheck.enabled
    discovery: bool | None = setting(None)  # None: follow healthCheck.discovery


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    type: str = setting("model-aware", validate.OneOf(STRATEGIES))
    adaptive: bool = setting(False)  # weight choices by each node's observed latency
    maxWarmWaitMs: int = setting(10_000, NON_NEGATIVE)  # model-aware: wait for a busy warm node


@dataclass(frozen=True, slots=True)
class DisruptorConfig:
    ringBufferSize: int = setting(1024, _power_of_two, restart=True)
    waitStrategy: str = setting("yielding", validate.OneOf(WAIT_STRATEGIES), restart=True)
    maxGlobalInFlight: int = setting(1024, POSITIVE)
    queueSize: int = setting(512, NON_NEGATIVE)  # requests waiting for node capacity, in all
    queueTimeoutMs: int = setting(30_000, NON_NEGATIVE)  # longest wait for capacity, then 503


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    requestTimeoutMs: int = setting(300_000, POSITIVE)  # queue + connect + first byte
    connectTimeoutMs: int = setting(5_000, POSITIVE)
    healthCheckTimeoutMs: int = setting(2_000, POSITIVE)
    firstByteTimeoutMs: int = setting(240_000, POSITIVE)  # a cold model load is not a dead node
    streamIdleTimeoutMs: int = setting(120_000, POSITIVE)  # silence between two stream chunks
    pullIdleTimeoutMs: int = setting(300_000, POSITIVE)  # pull/create/blob: no progress this long


@dataclass(frozen=True, slots=True)
class RetryConfig:
    maxRetries: int = setting(2, NON_NEGATIVE)
    initialBackoffMs: int = setting(50, NON_NEGATIVE)
    maxBackoffMs: int = setting(2_000, NON_NEGATIVE)
    backoffMultiplier: float = setting(2.0, AT_LEAST_ONE)


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    intervalMs: int = setting(5_000, POSITIVE)
    degradedThreshold: int = setting(1, POSITIVE)
    downThreshold: int = setting(3, POSITIVE)
    circuitBreakerFailureThreshold: int = setting(5, POSITIVE)
    circuitBreakerRecoveryMs: int = setting(30_000, POSITIVE)
    enabled: bool = setting(True)
    discovery: bool = setting(True)  # learn installed (/api/tags) and loaded (/api/ps) models
    modelRefreshMs: int = setting(10_000, POSITIVE)


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    maxPromptLength: int = setting(1_000_000, POSITIVE)
    allowedModels: tuple[str, ...] = setting(())  # empty: every model


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = setting(True)
    prefix: str = setting("ollama_lb", METRIC_NAME)
    public: bool = setting(False)  # with API keys set: /metrics without an admin key?


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None = setting(None)  # also OLLAMA_LB_ADMIN_TOKEN; none: loopback clients only


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


_GO_DURATION = re.compile(r"[-+]?((\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h))+|[-+]?0")


def _duration(value: str) -> None:
    if not _GO_DURATION.fullmatch(value):
        raise ValidationError(f"must be a duration as Ollama's keep_alive takes it (30m, 1h30m, "
                              f"-1s), got {value!r}")


def _seconds(value: Any) -> Any:
    """``keepAlive: 300`` means seconds, as a JSON number does in keep_alive."""
    return f"{value}s" if isinstance(value, int | float) and not isinstance(value, bool) else value


def _unique_models(models: list[Any]) -> None:
    names = [m.name.lower() if ":" in m.name.rsplit("/", 1)[-1] else f"{m.name.lower()}:latest"
             for m in models]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ValidationError(f"model(s) named more than once: {', '.join(dupes)}")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """``models[]``: where one model is kept (``replicas`` or ``nodes``; neither: every node)."""

    name: str = setting(validator=NOT_EMPTY)  # as /api/tags names it; any spelling
    replicas: int | None = setting(None, POSITIVE)  # on this many nodes, chosen by free room
    nodes: tuple[str, ...] = setting((), items=NOT_EMPTY)  # on exactly these node ids
    warm: bool = setting(False)  # keep it loaded on its nodes
    keepAlive: str | None = setting(None, _duration, clean=_seconds)  # for requests without one

    def __post_init__(self) -> None:
        if self.replicas is not None and self.nodes:
            raise ValidationError("replicas and nodes are alternatives: set one of them")


@dataclass(frozen=True, slots=True)
class PlacementConfig:
    prune: bool = setting(False)  # delete models the config does not name (and extra copies)
    intervalMs: int = setting(30_000, POSITIVE)  # the reconciler's period (it also wakes on change)


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = setting("INFO", validate.OneOf(LOG_LEVELS))
    logBodies: bool = setting(False)  # prompts and replies are never logged unless true


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = field(default_factory=ServerConfig)
    nodes: tuple[NodeConfig, ...] = ()
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    disruptor: DisruptorConfig = field(default_factory=DisruptorConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    retry: RetryConfig = field(default_factory=RetryConfig)
    healthCheck: HealthCheckConfig = field(default_factory=HealthCheckConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    security: SecurityConfig = field(default_factory=SecurityConfig)
    models: tuple[ModelConfig, ...] = setting((), _unique_models)
    placement: PlacementConfig = field(default_factory=PlacementConfig)

    def admin_token(self) -> str | None:
        """The admin bearer token: the config's, else the environment's."""
        return self.admin.token or os.environ.get("OLLAMA_LB_ADMIN_TOKEN") or None

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secrets replaced, for GET /admin/config."""
        data = to_dict(self)
        if data["admin"]["token"]:
            data["admin"]["token"] = "***"
        for key in data["security"]["apiKeys"]:
            key["hash"] = "***"  # a digest of a random key is no secret, but why show it
        return data


def to_dict(obj: Any) -> Any:
    """Frozen config objects as plain JSON-able data."""
    if hasattr(obj, "__dataclass_fields__"):
        return {fl.name: to_dict(getattr(obj, fl.name)) for fl in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    return obj


def settings(cls: type = Config, prefix: str = "") -> Iterator[tuple[str, Field[Any]]]:
    """Every key of the file as ``(path, field)``: ``server.port``, ``nodes[].url``,
    ``security.apiKeys[].name``, ...: nested sections and lists of them are walked into."""
    hints = get_type_hints(cls)
    for fl in fields(cls):
        hint, path = hints[fl.name], f"{prefix}{fl.name}"
        if get_origin(hint) is tuple and is_dataclass(get_args(hint)[0]):
            yield from settings(get_args(hint)[0], f"{path}[].")
        elif is_dataclass(hint):
            yield from settings(hint, f"{path}.")
        else:
            yield path, fl


# --- schemas, derived from the dataclasses -----------------------------------------------------

SCALARS: dict[type, type[f.Field]] = {bool: f.Boolean, int: f.Integer, float: f.Float,
                                       str: f.String}


class _Section(Schema):
    """A config section: unknown keys raise; absent keys take the dataclass's defaults."""

    target: type = object
    cleaners: dict[str, Callable[[Any], Any]] = {}

    class Meta:
        unknown = RAISE

    @pre_load
    def clean(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict) and any(k in data for k in self.cleaners):
            data = {k: self.cleaners[k](v) if k in self.cleaners else v for k, v in data.items()}
        return data

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Any:
        return self.target(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def _schema_field(hint: Any, fl: Field[Any]) -> f.Field:
    """The marshmallow field for one dataclass field, from its type hint and its metadata."""
    kwargs: dict[str, Any] = {"required": fl.default is MISSING and fl.default_factory is MISSING,
                              "validate": fl.metadata.get("validate")}
    if isinstance(hint, UnionType) and NoneType in get_args(hint):
        (hint,) = (a for a in get_args(hint) if a is not NoneType)
        kwargs["allow_none"] = True
    if get_origin(hint) is tuple:  # tuple[X, ...]: a YAML list
        item = get_args(hint)[0]
        inner = (f.Nested(schema_for(item)) if is_dataclass(item)
                 else SCALARS[item](validate=fl.metadata.get("items")))
        return f.List(inner, **kwargs)
    if is_dataclass(hint):
        return f.Nested(schema_for(hint), **kwargs)
    return SCALARS[hint](**kwargs)


@cache
def schema_for(cls: type, base: type[Schema] = _Section) -> type[Schema]:
    """The schema of one config dataclass: a field per dataclass field, in the same order."""
    hints = get_type_hints(cls)
    attrs: dict[str, Any] = {"target": cls, "cleaners": {
        fl.name: fl.metadata["clean"] for fl in fields(cls) if "clean" in fl.metadata}}
    for fl in sorted(fields(cls), key=lambda fl: fl.name != "nodes"):  # nodes' problems first
        attrs[fl.name] = _schema_field(hints[fl.name], fl)
    return type(cls.__name__.replace("Config", "") + "Schema", (base,), attrs)


class _Root(_Section):
    """The whole file: a mapping; an empty section (``server:`` alone) takes every default."""

    @pre_load
    def mapping(self, data: Any, **_: Any) -> Any:
        if not isinstance(data, dict):
            raise ValidationError("the config must be a YAML mapping", "_schema")
        return {k: v for k, v in data.items() if v is not None or k not in self.fields}

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Any:
        ids = [n.id for n in data.get("nodes", ())]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValidationError({"nodes": [f"duplicate node id(s): {', '.join(dupes)}"]})
        for i, model in enumerate(data.get("models", ())):
            unknown = sorted(set(model.nodes) - set(ids))
            if unknown:
                raise ValidationError({"models": {i: {"nodes": [
                    f"unknown node id(s): {', '.join(unknown)}"]}}})
        return super().build(data)


ConfigSchema = schema_for(Config, _Root)


def flatten_errors(messages: Any, prefix: str = "") -> list[str]:
    """Marshmallow's nested error dict as ``key.path: message`` lines, in key order."""
    if isinstance(messages, Mapping):
        out: list[str] = []
        for key, value in messages.items():
            path = prefix if key == "_schema" else f"{prefix}.{key}" if prefix else str(key)
            out.extend(flatten_errors(value, path))
        return out
    if isinstance(messages, list | tuple):
        out = []
        for item in messages:
            out.extend(flatten_errors(item, prefix))
        return out
    return [f"{prefix or '(top)'}: {messages}"]


def parse_config(data: Any, source: str = "config") -> Config:
    """Validate already-parsed YAML data; raise ConfigError listing every problem."""
    try:
        return ConfigSchema().load(data if data is not None else {})
    except ValidationError as exc:
        raise ConfigError(flatten_errors(exc.messages), source) from None


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read, parse and validate a YAML config file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"cannot read file: {exc.strerror or exc}"], source) from None
    return parse_text(text, source)


def parse_text(text: str, source: str = "config") -> Config:
    """Parse YAML text (``yaml.safe_load``: no arbitrary objects) and validate it."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"invalid YAML: {exc}"], source) from None
    return parse_config(data, source)


# --- restart-only keys -------------------------------------------------------------------------

#: ``(section, key)`` of every key marked ``restart=True``, in declaration order.
RESTART_KEYS: tuple[tuple[str, str], ...] = tuple(
    (name, fl.name) for name, hint in get_type_hints(Config).items() if is_dataclass(hint)
    for fl in fields(hint) if fl.metadata.get("restart"))


def restart_required(old: Config, new: Config) -> list[str]:
    """Keys whose change only a restart can apply (reported, never half-applied)."""
    return [f"{s}.{k}" for s, k in RESTART_KEYS
            if getattr(getattr(old, s), k) != getattr(getattr(new, s), k)]


def with_restart_keys_from(old: Config, new: Config) -> Config:
    """``new`` with the restart-only keys kept as ``old`` has them, so nothing is half-applied."""
    kept: dict[str, dict[str, Any]] = {}
    for s, k in RESTART_KEYS:
        kept.setdefault(s, {})[k] = getattr(getattr(old, s), k)
    return replace(new, **{s: replace(getattr(new, s), **keys) for s, keys in kept.items()})
