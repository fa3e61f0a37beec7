"""The WSGI layer that ends an admitted request's accounting, exactly once.

The gate (``app/auth.py``) admits a request with a ``Grant`` in the environ. This layer, around
the Flask app, sees the reply go out: its status, its first byte (time to first token), the
token counts in it (``app/tokencount.py``). When the server closes the reply, however it ended
(complete, failed, the client gone, iteration never started), ``finish`` runs once: the
in-flight place is released and the reply charged. It is an object with ``close()`` rather
than a generator for that reason: a generator's ``finally`` does not run if it never started.

A grant whose key was removed by a reload is ``revoked``: its stream ends at the next piece
with one error line in the stream's own format, and the node's stream is closed. A whole
reply (not a stream) is delivered as it is: the node's work is done, and emptying a body
whose ``Content-Length`` is already set would leave the client a broken reply.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from app.limits import Grant
from app.tokencount import TokenCounter, is_stream
from pipeline.endpoints import ANTHROPIC, OPENAI, api_for

GRANT = "ollama_lb.grant"
#: a stream's error line (native, OpenAI, Anthropic) at the start of a piece or of any of its
#: lines (a piece is every line that arrived in one read): the reply failed after all
ERROR_LINE = re.compile(rb'(?:^|\n)(?:\{"error"|data: \{"error"|event: error)')
REVOKED = "API key revoked"
StartResponse = Callable[..., Any]


def revoked_line(content_type: str, path: str) -> bytes:
    """The one error line a revoked stream (NDJSON or SSE) ends with."""
    if "ndjson" in content_type:
        return json.dumps({"error": REVOKED}).encode() + b"\n"
    api = api_for(path)
    if api == ANTHROPIC:
        frame = {"type": "error", "error": {"type": "authentication_error", "message": REVOKED}}
        return b"event: error\ndata: " + json.dumps(frame).encode() + b"\n\n"
    error = {"message": REVOKED, "type": "invalid_request_error", "param": None,
             "code": "invalid_api_key"}
    if api == OPENAI:
        return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"
    return b"data: " + json.dumps({"error": REVOKED}).encode() + b"\n\n"


class Metered:
    """An admitted request's reply on its way out."""

    __slots__ = ("closed", "content_type", "counter", "cut", "failed", "finish", "first_at",
                 "grant", "inner", "path", "status", "streamed")

    def __init__(self, inner: Iterable[bytes], grant: Grant, status: int, content_type: str,
                 path: str, finish: Callable[[Metered], None]) -> None:
        self.inner = inner
        self.grant = grant
        self.status = status
        self.content_type = content_type
        self.path = path
        self.finish = finish
        self.counter = TokenCounter(content_type) if grant.counts_tokens else None
        self.first_at: float | None = None
        self.cut = False  # ended because the key was revoked
        self.failed = False  # a stream that ended with an error line
        self.closed = False
        #: a stream (NDJSON or SSE): only then can a piece carry an error line
        self.streamed = is_stream(content_type)

    def __iter__(self) -> Iterator[bytes]:
        counter, streamed = self.counter, self.streamed
        allowance, epoch = self.grant.allowance, self.grant.epoch
        for chunk in self.inner:
            if streamed and allowance.epoch != epoch:  # the key was removed: revoked
                self.cut = True
                yield revoked_line(self.content_type, self.path)
                return
            if chunk:
                if self.first_at is None:
                    self.first_at = time.monotonic()
                if counter is not None:
                    counter.observe(chunk)
                if streamed and ERROR_LINE.search(chunk) is not None:
                    self.failed = True
            yield chunk

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            close = getattr(self.inner, "close", None)
            if close is not None:
                close()
        finally:
            self.finish(self)


def end_unanswered(environ: dict[str, Any], finish: Callable[[Metered], None]) -> None:
    """The app raised before answering (a bug, or its greenlet killed): an admitted request
    still ends its accounting once, as a 500."""
    grant = environ.pop(GRANT, None)
    if grant is not None:
        finish(Metered((), grant, 500, "", environ.get("PATH_INFO", ""), finish))


class Meter:
    """WSGI middleware: wraps the reply of every request the gate admitted with a grant."""

    def __init__(self, app: Callable[[dict[str, Any], StartResponse], Iterable[bytes]],
                 finish: Callable[[Metered], None]) -> None:
        self.app = app
        self.finish = finish

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        seen: list[Any] = ["500", ()]

        def capture(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            seen[0], seen[1] = status, headers
            return start_response(status, headers, exc_info)

        try:
            result = self.app(environ, capture)
        except BaseException:
            end_unanswered(environ, self.finish)
            raise
        grant = environ.get(GRANT)
        if grant is None:
            return result
        ctype = next((v for k, v in seen[1] if k.lower() == "content-type"), "")
        status = int(seen[0].split(" ", 1)[0]) if seen[0][:3].isdigit() else 500
        return Metered(result, grant, status, ctype, environ.get("PATH_INFO", ""), self.finish)
