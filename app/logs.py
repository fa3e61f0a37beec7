"""Structured logs: one JSON object per line, on stderr (journald keeps it as is).

Fields passed with ``extra={...}`` become top-level keys, so an access line reads
``{"ts": ..., "level": "INFO", "event": "request", "request_id": ..., "node": ...}``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure(level: str = "INFO", stream: Any = None) -> None:
    """Route every ``ollama_lb`` logger to one JSON handler at ``level``."""
    root = logging.getLogger("ollama_lb")
    root.setLevel(level)
    root.propagate = False
    handler = next((h for h in root.handlers if getattr(h, "_ollama_lb", False)), None)
    if handler is None:
        handler = logging.StreamHandler(stream or sys.stderr)
        handler._ollama_lb = True  # type: ignore[attr-defined]
        handler.setFormatter(JsonFormatter())
        root.addHandler(handler)
