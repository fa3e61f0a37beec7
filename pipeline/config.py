"""The appliance configuration: YAML in, validated, frozen objects out.

The file format keeps every key of the original Java project's ``config.yaml`` (camelCase, same
sections, same defaults) and adds a few keys of its own, each documented in the README. Unknown
keys are errors, never silently ignored: a typo in a production config must not pass unnoticed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import urlsplit

import yaml
from marshmallow import RAISE, Schema, ValidationError, post_load, pre_load, validate
from marshmallow import fields as f

STRATEGIES = ("round-robin", "weighted-round-robin", "least-in-flight", "random", "model-aware")
WAIT_STRATEGIES = ("blocking", "sleeping", "yielding", "busy-spin")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class ConfigError(ValueError):
    """A config that cannot be used; ``problems`` lists ``key.path: message`` lines."""

    def __init__(self, problems: list[str], source: str = "config") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: " + "; ".join(problems))


@dataclass(frozen=True, slots=True)
class ServerConfig:
    port: int = 8080
    host: str = "0.0.0.0"
    backlog: int = 1024
    maxBodyBytes: int = 64 * 1024 * 1024  # base64 images make bodies tens of MB
    drainSeconds: float = 30.0  # how long SIGTERM waits for in-flight streams
    allowedOrigins: tuple[str, ...] = ()  # CORS beyond Ollama's defaults (OLLAMA_ORIGINS)
    writeTimeoutMs: int = 30_000  # a client that takes nothing of a reply for this long is cut
    keepAliveTimeoutMs: int = 75_000  # an idle kept-alive client connection is closed after this


@dataclass(frozen=True, slots=True)
class NodeConfig:
    id: str
    url: str
    models: tuple[str, ...] = ()
    maxConcurrentRequests: int = 4
    weight: int = 1
    enabled: bool = True
    healthCheck: bool | None = None  # None: follow healthCheck.enabled
    discovery: bool | None = None  # None: follow healthCheck.discovery


@dataclass(frozen=True, slots=True)
class StrategyConfig:
    type: str = "model-aware"
    adaptive: bool = False  # weight choices by each node's observed latency
    maxWarmWaitMs: int = 10_000  # model-aware: longest wait for a busy warm node over an idle one


@dataclass(frozen=True, slots=True)
class DisruptorConfig:
    ringBufferSize: int = 1024
    waitStrategy: str = "yielding"
    maxGlobalInFlight: int = 1024
    queueSize: int = 512  # requests waiting for node capacity, across all models
    queueTimeoutMs: int = 30_000  # longest wait for node capacity before 503


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    requestTimeoutMs: int = 300_000  # queue + connect + first byte (whole reply if not streamed)
    connectTimeoutMs: int = 5_000
    healthCheckTimeoutMs: int = 2_000
    firstByteTimeoutMs: int = 240_000  # a cold model load can take minutes: not a dead node
    streamIdleTimeoutMs: int = 120_000  # silence between two chunks of a started stream


@dataclass(frozen=True, slots=True)
class RetryConfig:
    maxRetries: int = 2
    initialBackoffMs: int = 50
    maxBackoffMs: int = 2_000
    backoffMultiplier: float = 2.0


@dataclass(frozen=True, slots=True)
class HealthCheckConfig:
    intervalMs: int = 5_000
    degradedThreshold: int = 1
    downThreshold: int = 3
    circuitBreakerFailureThreshold: int = 5
    circuitBreakerRecoveryMs: int = 30_000
    enabled: bool = True
    discovery: bool = True  # learn installed (/api/tags) and loaded (/api/ps) models
    modelRefreshMs: int = 10_000


@dataclass(frozen=True, slots=True)
class ValidationConfig:
    maxPromptLength: int = 1_000_000
    allowedModels: tuple[str, ...] = ()  # empty: every model


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    enabled: bool = True
    prefix: str = "ollama_lb"


@dataclass(frozen=True, slots=True)
class AdminConfig:
    token: str | None = None  # also OLLAMA_LB_ADMIN_TOKEN; none: loopback clients only


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: str = "INFO"
    logBodies: bool = False  # prompts and replies are never logged unless this is true


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

    def admin_token(self) -> str | None:
        """The admin bearer token: the config's, else the environment's."""
        return self.admin.token or os.environ.get("OLLAMA_LB_ADMIN_TOKEN") or None

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with secrets replaced, for GET /admin/config."""
        data = to_dict(self)
        if data["admin"]["token"]:
            data["admin"]["token"] = "***"
        return data


def to_dict(obj: Any) -> Any:
    """Frozen config objects as plain JSON-able data."""
    if hasattr(obj, "__dataclass_fields__"):
        return {fl.name: to_dict(getattr(obj, fl.name)) for fl in fields(obj)}
    if isinstance(obj, tuple):
        return [to_dict(x) for x in obj]
    return obj


# --- schemas -----------------------------------------------------------------------------------

POSITIVE = validate.Range(min=1)
NON_NEGATIVE = validate.Range(min=0)


def _defaults(cls: type) -> dict[str, Any]:
    return {fl.name: getattr(cls(), fl.name) for fl in fields(cls)}


class _Section(Schema):
    """A config section: unknown keys raise, a post_load builds the frozen object."""

    target: type = object

    class Meta:
        unknown = RAISE

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Any:
        return self.target(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


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


class ServerSchema(_Section):
    target = ServerConfig
    port = f.Integer(load_default=8080, validate=validate.Range(min=0, max=65535))
    host = f.String(load_default="0.0.0.0")
    backlog = f.Integer(load_default=1024, validate=POSITIVE)
    maxBodyBytes = f.Integer(load_default=64 * 1024 * 1024, validate=POSITIVE)
    drainSeconds = f.Float(load_default=30.0, validate=NON_NEGATIVE)
    allowedOrigins = f.List(f.String(validate=validate.Length(min=1)), load_default=list)
    writeTimeoutMs = f.Integer(load_default=30_000, validate=POSITIVE)
    keepAliveTimeoutMs = f.Integer(load_default=75_000, validate=POSITIVE)


class NodeSchema(_Section):
    target = NodeConfig
    id = f.String(required=True, validate=validate.Length(min=1))
    url = f.String(required=True, validate=_http_url)
    models = f.List(f.String(validate=validate.Length(min=1)), load_default=list)
    maxConcurrentRequests = f.Integer(load_default=4, validate=POSITIVE)
    weight = f.Integer(load_default=1, validate=POSITIVE)
    enabled = f.Boolean(load_default=True)
    healthCheck = f.Boolean(load_default=None, allow_none=True)
    discovery = f.Boolean(load_default=None, allow_none=True)

    @pre_load
    def strip_url(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("url"), str):
            data = {**data, "url": data["url"].rstrip("/")}
        return data


class StrategySchema(_Section):
    target = StrategyConfig
    type = f.String(load_default="model-aware", validate=validate.OneOf(STRATEGIES))
    adaptive = f.Boolean(load_default=False)
    maxWarmWaitMs = f.Integer(load_default=10_000, validate=NON_NEGATIVE)


class DisruptorSchema(_Section):
    target = DisruptorConfig
    ringBufferSize = f.Integer(load_default=1024, validate=_power_of_two)
    waitStrategy = f.String(load_default="yielding", validate=validate.OneOf(WAIT_STRATEGIES))
    maxGlobalInFlight = f.Integer(load_default=1024, validate=POSITIVE)
    queueSize = f.Integer(load_default=512, validate=NON_NEGATIVE)
    queueTimeoutMs = f.Integer(load_default=30_000, validate=NON_NEGATIVE)


def _section_schema(cls: type, **overrides: f.Field) -> type[_Section]:
    """A schema whose fields are all optional with the dataclass defaults, positive numbers."""
    attrs: dict[str, Any] = {"target": cls}
    for name, default in _defaults(cls).items():
        if name in overrides:
            attrs[name] = overrides[name]
        elif isinstance(default, bool):
            attrs[name] = f.Boolean(load_default=default)
        elif isinstance(default, int):
            attrs[name] = f.Integer(load_default=default, validate=POSITIVE)
        elif isinstance(default, float):
            attrs[name] = f.Float(load_default=default, validate=validate.Range(min=1.0))
    return type(cls.__name__.replace("Config", "Schema"), (_Section,), attrs)


TimeoutsSchema = _section_schema(TimeoutsConfig)
RetrySchema = _section_schema(
    RetryConfig,
    maxRetries=f.Integer(load_default=2, validate=NON_NEGATIVE),
    initialBackoffMs=f.Integer(load_default=50, validate=NON_NEGATIVE),
    maxBackoffMs=f.Integer(load_default=2_000, validate=NON_NEGATIVE),
)
HealthCheckSchema = _section_schema(HealthCheckConfig)


class ValidationSchema(_Section):
    target = ValidationConfig
    maxPromptLength = f.Integer(load_default=1_000_000, validate=POSITIVE)
    allowedModels = f.List(f.String(), load_default=list)


class MetricsSchema(_Section):
    target = MetricsConfig
    enabled = f.Boolean(load_default=True)
    prefix = f.String(
        load_default="ollama_lb",
        validate=validate.Regexp(r"^[a-zA-Z_][a-zA-Z0-9_]*$", error="must be a metric name"),
    )


class AdminSchema(_Section):
    target = AdminConfig
    token = f.String(load_default=None, allow_none=True)


class LoggingSchema(_Section):
    target = LoggingConfig
    level = f.String(load_default="INFO", validate=validate.OneOf(LOG_LEVELS))
    logBodies = f.Boolean(load_default=False)


SECTIONS: dict[str, type[_Section]] = {
    "server": ServerSchema,
    "strategy": StrategySchema,
    "disruptor": DisruptorSchema,
    "timeouts": TimeoutsSchema,
    "retry": RetrySchema,
    "healthCheck": HealthCheckSchema,
    "validation": ValidationSchema,
    "metrics": MetricsSchema,
    "admin": AdminSchema,
    "logging": LoggingSchema,
}


class ConfigSchema(Schema):
    class Meta:
        unknown = RAISE

    nodes = f.List(f.Nested(NodeSchema), load_default=list)
    locals().update({name: f.Nested(schema) for name, schema in SECTIONS.items()})

    @pre_load
    def fill_sections(self, data: Any, **_: Any) -> Any:
        """Absent or empty sections take every default (``server:`` alone parses as None)."""
        if not isinstance(data, dict):
            raise ValidationError("the config must be a YAML mapping", "_schema")
        data = dict(data)
        for name in SECTIONS:
            if data.get(name) is None:
                data[name] = {}
        if data.get("nodes") is None:
            data["nodes"] = []
        return data

    @post_load
    def build(self, data: dict[str, Any], **_: Any) -> Config:
        ids = [n.id for n in data["nodes"]]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValidationError({"nodes": [f"duplicate node id(s): {', '.join(dupes)}"]})
        data["nodes"] = tuple(data["nodes"])
        return Config(**data)


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


def restart_required(old: Config, new: Config) -> list[str]:
    """Keys whose change only a restart can apply (reported, never half-applied)."""
    keys = []
    for name in ("host", "port", "backlog"):
        if getattr(old.server, name) != getattr(new.server, name):
            keys.append(f"server.{name}")
    if old.disruptor.ringBufferSize != new.disruptor.ringBufferSize:
        keys.append("disruptor.ringBufferSize")
    if old.disruptor.waitStrategy != new.disruptor.waitStrategy:
        keys.append("disruptor.waitStrategy")
    return keys


def with_restart_keys_from(old: Config, new: Config) -> Config:
    """``new`` with the restart-only keys kept as ``old`` has them, so nothing is half-applied."""
    server = replace(new.server, host=old.server.host, port=old.server.port,
                     backlog=old.server.backlog)
    disruptor = replace(new.disruptor, ringBufferSize=old.disruptor.ringBufferSize,
                        waitStrategy=old.disruptor.waitStrategy)
    return replace(new, server=server, disruptor=disruptor)
