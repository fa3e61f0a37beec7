"""The pipeline's flat error hierarchy.

Errors carry a machine code, never an HTTP status: the HTTP layer (``app/errors.py``) is the one
place that maps codes to statuses, so the pipeline stays usable as a library without HTTP.
"""

from __future__ import annotations

from enum import StrEnum


class ErrorCode(StrEnum):
    """What went wrong, in terms a caller can act on."""

    INVALID_REQUEST = "INVALID_REQUEST"  # bad JSON, wrong type, empty body
    VALIDATION = "VALIDATION"  # a configured validation rule refused the request
    MODEL_REQUIRED = "MODEL_REQUIRED"  # the request names no model (chat, show, ...)
    MODEL_NOT_FOUND = "MODEL_NOT_FOUND"  # no node in the pool has the model
    NO_AVAILABLE_NODE = "NO_AVAILABLE_NODE"  # nodes have the model, none can serve now
    BACKPRESSURE = "BACKPRESSURE"  # ring, queue or global in-flight limit full
    TIMEOUT = "TIMEOUT"  # the request deadline passed
    UPSTREAM = "UPSTREAM"  # the node failed and no retry was possible
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    SHUTTING_DOWN = "SHUTTING_DOWN"
    CANCELLED = "CANCELLED"  # the caller went away (or gave up) before the reply
    INTERNAL = "INTERNAL"  # a bug: a stage raised


class PipelineError(Exception):
    """An error with a machine code and an Ollama-worded message.

    ``retry_after`` (seconds) is set where waiting and trying again is the right reaction.
    """

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after

    def __repr__(self) -> str:
        return f"PipelineError({self.code.value}, {self.message!r})"


class BackpressureError(PipelineError):
    """The appliance is full: the caller should back off and retry (the seed's name)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(ErrorCode.BACKPRESSURE, message, retry_after)


class RingFullError(BackpressureError):
    """No free ring slot: raised by the producer without blocking."""

    def __init__(self) -> None:
        super().__init__("server busy, please try again.  ring buffer full", 1.0)
