"""The ``models`` and ``placement`` sections: where models are kept, declared once."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from marshmallow import ValidationError

from pipeline.config_keys import NOT_EMPTY, POSITIVE, setting

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
