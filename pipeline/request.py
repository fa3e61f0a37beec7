"""What goes into the pipeline and what comes out: plain data, no HTTP framework objects.

A request carries the client's body bytes untouched (they are forwarded byte for byte); a
response is either complete (``InferenceResponse``) or a live stream (``StreamHandle``) whose
``close()`` gives the node slot back, whether the stream ended, failed or was abandoned.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from random import getrandbits
from typing import Any

from gevent import Timeout, get_hub
from gevent.hub import Waiter
from greenlet import getcurrent

from pipeline.errors import ErrorCode, PipelineError


def new_request_id() -> str:
    """16 hex digits of randomness: unique enough for logs, far cheaper than uuid4, without a
    system call (``random`` reseeds in a forked child, so workers do not repeat each other)."""
    return f"{getrandbits(64):016x}"


@dataclass(slots=True)
class InferenceRequest:
    """One model-routed call: path, raw body and what the pipeline needs to route it."""

    path: str
    body: bytes
    method: str = "POST"
    model: str | None = None  # set when the model is not in the body (/v1/models/<name>)
    headers: tuple[tuple[str, str], ...] = ()  # forwarded to the node (User-Agent, Accept)
    request_id: str = field(default_factory=new_request_id)
    correlation_id: str | None = None  # the client's X-Correlation-ID, logged as is
    client: str = "library"
    timeout_s: float | None = None  # overrides timeouts.requestTimeoutMs
    facts: Any = None  # pipeline.validation.Facts when the caller parsed the body already
    key: str | None = None  # the API key's configured name, never the key: for the access log

    @classmethod
    def of_prompt(
        cls, model: str, prompt: str, *, stream: bool = False, **fields: Any
    ) -> InferenceRequest:
        """A generate request, as the seed's ``InferenceRequest.ofPrompt``."""
        return cls.of_json("/api/generate", {"model": model, "prompt": prompt,
                                             "stream": stream, **fields})

    @classmethod
    def of_chat(
        cls, model: str, messages: list[dict[str, Any]], *, stream: bool = False, **fields: Any
    ) -> InferenceRequest:
        """A chat request; ``messages`` as Ollama takes them (role, content)."""
        return cls.of_json("/api/chat", {"model": model, "messages": messages,
                                         "stream": stream, **fields})

    @classmethod
    def of_embed(cls, model: str, input: str | list[str], **fields: Any) -> InferenceRequest:
        return cls.of_json("/api/embed", {"model": model, "input": input, **fields})

    @classmethod
    def of_json(cls, path: str, payload: dict[str, Any]) -> InferenceRequest:
        return cls(path=path, body=json.dumps(payload).encode())


class InferenceResponse:
    """A complete reply from a node: status, content type and body bytes."""

    __slots__ = ("_json", "attempts", "body", "content_type", "node_id", "status")

    def __init__(self, status: int, content_type: str, body: bytes, node_id: str,
                 attempts: int) -> None:
        self.status = status
        self.content_type = content_type
        self.body = body
        self.node_id = node_id
        self.attempts = attempts
        self._json: Any = None

    def json(self) -> Any:
        if self._json is None:
            self._json = json.loads(self.body)
        return self._json

    @property
    def response(self) -> str:
        """The generated text of a generate reply (``response``) or a chat reply."""
        data = self.json()
        if "response" in data:
            return data["response"]
        return (data.get("message") or {}).get("content", "")

    @property
    def message(self) -> dict[str, Any] | None:
        return self.json().get("message")


class StreamHandle:
    """A started stream: iterate ``lines()`` for raw lines, ``chunks()`` for parsed objects.

    ``close()`` is idempotent and must be called (the context manager does): it closes the
    upstream response and releases the node slot exactly once.
    """

    def __init__(self, status: int, content_type: str, lines: Iterator[bytes],
                 close: Callable[[], None], node_id: str, attempts: int,
                 pump: Callable[[Callable[[bytes], bytes]], bytes | None] | None = None
                 ) -> None:
        self.status = status
        #: relays from the hub's loop between two pieces of ``lines()`` (``StreamRelay.pump``)
        self.pump = pump
        self.content_type = content_type
        self._lines = lines
        self._close = close
        self.node_id = node_id
        self.attempts = attempts
        self.closed = False

    def lines(self) -> Iterator[bytes]:
        """The upstream lines with their newlines as they arrive (every line that arrived in
        one read in one piece); an error ends with an error line."""
        return self._lines

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.chunks()

    def chunks(self) -> Iterator[dict[str, Any]]:
        """Parsed NDJSON objects (or SSE ``data:`` payloads); raises on an error line. A piece
        of ``lines()`` holds every line that arrived in one read."""
        for piece in self._lines:
            for raw in piece.splitlines():
                line = raw.strip()
                if not line:
                    continue
                if line.startswith(b"data:"):
                    line = line[5:].strip()
                    if line == b"[DONE]":
                        continue
                elif line.startswith(b"event:"):
                    continue  # an SSE event name: its data line follows
                obj = json.loads(line)
                if isinstance(obj, dict) and "error" in obj:
                    err = obj["error"]
                    msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
                    raise PipelineError(ErrorCode.UPSTREAM, msg)
                yield obj

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._close()

    def __enter__(self) -> StreamHandle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


Result = InferenceResponse | StreamHandle


class Ticket:
    """The caller's handle on a submitted request: wait with ``result()``.

    It also collects what the access log reports (node, attempts, queue wait, first byte).
    """

    __slots__ = ("_error", "_go", "_poked", "_ready", "_value", "_waiter", "abandoned",
                 "attempts", "cold", "deadline",
                 "endpoint", "eval_ns", "finished", "first_byte_at", "model", "model_raw",
                 "node_id", "on_cancel", "queue_wait", "request", "runner", "status", "stream",
                 "submitted_at", "tokens", "tokens_in", "waiting")

    def __init__(self, request: InferenceRequest, deadline: float) -> None:
        self.request = request
        self.submitted_at = time.monotonic()
        self.deadline = deadline
        self._ready = False  # resolved: a reply (_value) or an error (_error), once
        self._value: Result | None = None
        self._error: PipelineError | None = None
        self._poked = False  # something for result() to look at: the outcome or a handed call
        self._waiter: Waiter | None = None  # the caller parked in result(), until poked
        self._go: tuple[Callable[[Ticket, Any], None], Any, Callable[[Ticket, Any], None]
                        ] | None = None  # the handed call: run, lease, drop
        self.waiting = False  # a caller is blocked in result() (it can run the node call)
        self.runner: Any = None  # the greenlet running the node call inside result()
        self.attempts = 0
        self.node_id: str | None = None
        self.model: str | None = None  # canonical, set by validation
        self.model_raw = ""  # as the client wrote it
        self.endpoint: Any = None  # pipeline.endpoints.Endpoint, set by validation
        self.stream = False
        self.finished = False  # the pipeline's bookkeeping for this request is done
        self.status = ""  # outcome: the node's HTTP status or an error code
        self.queue_wait = 0.0
        #: the reply's completion (eval_count) and prompt token counts, when it reports them
        self.tokens: int | None = None
        self.tokens_in: int | None = None
        self.eval_ns: int | None = None  # Ollama's eval_duration: the generation's own time
        self.first_byte_at: float | None = None
        self.on_cancel: Callable[[], None] | None = None
        self.abandoned = False  # the caller went away while waiting (see abandon())
        self.cold = False  # dispatched to a node that did not have its model loaded

    def set(self, result: Result) -> bool:
        """Deliver the reply; False (and nothing changes) if the ticket was already resolved."""
        if self._ready:
            return False
        self._value, self._ready = result, True
        self._poke()
        return True

    def abandon(self, reason: str = "the client closed the connection") -> None:
        """The caller is gone: wake its ``result()``, which then cancels the work; a node call
        it is running is interrupted.

        Never blocks, so it may be called from a hub callback (a socket watcher).
        """
        if not self._ready:
            self.abandoned = True
            error = PipelineError(ErrorCode.CANCELLED, reason)
            self._error, self._ready = error, True
            self._poke()
            self.interrupt(error)

    def fail(self, error: PipelineError) -> None:
        if not self._ready:
            self._error, self._ready = error, True
            self._poke()

    def done(self) -> bool:
        return self._ready

    def _poke(self) -> None:
        """Tell ``result()`` there is something to look at. A parked caller is resumed through
        one hub callback into its ``Waiter``, which is safe whenever it runs: if the caller has
        left meanwhile (its timeout fired), the waiter only keeps the value."""
        self._poked = True
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            get_hub().loop.run_callback(waiter.switch, None)

    def hand(self, run: Callable[[Ticket, Any], None], lease: Any,
             drop: Callable[[Ticket, Any], None]) -> bool:
        """Give the node call to the caller waiting in ``result()``, to run in its own greenlet
        (no greenlet of its own, no hop back with the reply); False if nobody waits there.
        ``drop(ticket, lease)`` gives the lease back if the caller leaves before the call."""
        if not self.waiting or self._ready:
            return False
        self._go = (run, lease, drop)
        self.on_cancel = self._unclaimed
        self._poke()
        return True

    def _unclaimed(self) -> None:
        go, self._go = self._go, None
        if go is not None:
            go[2](self, go[1])

    def interrupt(self, error: PipelineError) -> None:
        """Stop the node call running in ``result()``: ``error`` is raised where it waits.
        Checked again when the hub delivers it, so it never lands after the call ended."""
        runner = self.runner
        if runner is None:
            return

        def throw() -> None:
            if self.runner is runner:
                runner.throw(error)

        get_hub().loop.run_callback(throw)

    def result(self, timeout: float | None = None) -> Result:
        """Wait for the reply; raise PipelineError on failure or TIMEOUT past the deadline.

        A node call handed over meanwhile (``hand``) runs here, under the same deadline, and
        if it has to wait for capacity again (every node busy) the wait goes on. One caller
        waits on a ticket (the handler that submitted it): the wake-up goes to one waiter.
        """
        if timeout is None:
            timeout = max(0.0, self.deadline - time.monotonic()) + 1.0
        expired = PipelineError(ErrorCode.TIMEOUT, "request timed out")
        self.waiting = True
        try:
            with Timeout(timeout, expired):
                while not self._ready:
                    if not self._poked:
                        self._park()
                    self._poked = False
                    if self._go is not None and not self._ready:
                        self._run_handed()
        except PipelineError as err:
            if err is not expired:
                raise
        finally:
            self.waiting = False
        if not self._ready or self.abandoned:
            self.cancel()  # always leaves the ticket resolved
        if self._error is not None:  # without the frames it was first raised in, as gevent
            raise self._error.with_traceback(None)  # re-raises (they hold leases, sockets)
        return self._value  # type: ignore[return-value]

    def _park(self) -> None:
        waiter = self._waiter = Waiter()
        try:
            waiter.get()
        finally:
            self._waiter = None

    def _run_handed(self) -> None:
        assert self._go is not None
        (run, lease, _), self._go = self._go, None
        self.on_cancel = self._cancel_running
        self.runner = getcurrent()
        try:
            run(self, lease)  # ends with the result set, or the request queued again
        finally:
            self.runner = None
            if self.on_cancel == self._cancel_running:
                self.on_cancel = None

    def _cancel_running(self) -> None:
        self.interrupt(PipelineError(ErrorCode.CANCELLED, "the caller went away"))

    def cancel(self) -> None:
        """The caller gave up: let the pipeline free whatever this request holds."""
        cb, self.on_cancel = self.on_cancel, None
        if cb is not None:
            cb()
        self.fail(PipelineError(ErrorCode.TIMEOUT, "request timed out"))
        # a result set concurrently (a stream) must still be released
        if self._error is None:
            value = self._value
            if isinstance(value, StreamHandle):
                value.close()
