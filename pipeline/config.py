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

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass, replace
from functools import cache
from types import NoneType, UnionType
from typing import Any, get_args, get_origin, get_type_hints

import yaml
from marshmallow import RAISE, Schema, ValidationError, post_load, pre_load, validate
from marshmallow import fields as f

from pipeline.config_keys import (
    AT_LEAST_ONE,
    METRIC_NAME,
    NON_NEGATIVE,
    NOT_EMPTY,
    PORT,
    POSITIVE,
    _http_url,
    _ip_network,
    _power_of_two,
    _strip_slash,
    setting,
)
from pipeline.config_models import ModelConfig, PlacementConfig, _unique_models
from pipeline.config_security import (  # noqa: F401 - re-exported for the app
    SCOPES,
    ApiKeyConfig,
    ClientLimitsConfig,
    SecurityConfig,
    TlsConfig,
)
from pipeline.config_shared import SharedStateConfig

STRATEGIES = ("round-robin", "weighted-round-robin", "least-in-flight", "random", "model-aware")
WAIT_STRATEGIES = ("blocking", "sleeping", "yielding", "busy-spin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists ``key.path: message`` lines."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


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
    tls: TlsConfig = setting(TlsConfig())  # noqa: RUF009 - frozen. No files: plain HTTP
    maxRequestLineBytes: int = setting(8192, POSITIVE)  # longer request lines get 431
    maxHeaderBytes: int = setting(32_768, POSITIVE)  # all header lines together; more: 431
    maxHeaderCount: int = setting(100, POSITIVE)  # header lines; more: 431
    headerTimeoutMs: int = setting(10_000, POSITIVE)  # first byte (or accept) to end of head
    bodyTimeoutMs: int = setting(60_000, POSITIVE)  # for a body, plus 1 s per minimum rate
    bodyMinBytesPerSecond: int = setting(65_536, POSITIVE)  # slower bodies get 408
    maxConnectionsPerClient: int = setting(256, NON_NEGATIVE)  # per client IP; 0: no cap
    connectionLimitExempt: tuple[str, ...] = setting(("127.0.0.0/8", "::1"),
                                                     items=_ip_network)
    workers: int = setting(1, POSITIVE,  # processes; "auto": one per core (app/master.py)
                           clean=lambda v: len(os.sched_getaffinity(0)) if v == "auto" else v)


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
    sharedState: SharedStateConfig = field(default_factory=SharedStateConfig)  # Redis caps

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
