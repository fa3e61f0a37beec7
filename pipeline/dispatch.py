"""Dispatch: one greenlet per request talks to the node, with retries before the first byte.

The dispatch stage only spawns; the LLM call runs here, off the ring. Retries happen only
before anything has reached the caller: on a connect failure, a reset before the response
headers, a first-byte timeout, or a 502/503/504 from the node (Ollama's 503 "server busy"
included), with exponential backoff and jitter, on a different node where one can serve, and
within the request's deadline. Once a reply has started, a failure ends it with one error line.

Ownership of the node slot is explicit: ``held`` is released in ``finally`` unless it has been
handed to a StreamHandle, whose ``close()`` releases it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import gevent
import requests
from urllib3.exceptions import HTTPError as Urllib3Error

from pipeline.errors import ErrorCode, PipelineError
from pipeline.request import InferenceResponse, StreamHandle, Ticket
from pipeline.upstream import is_stream, whole_lines

if TYPE_CHECKING:
    from pipeline.node import Node
    from pipeline.pipeline import Pipeline

log = logging.getLogger("ollama_lb.dispatch")

RETRYABLE_STATUS = frozenset({502, 503, 504})
TRANSPORT_ERRORS = (requests.RequestException, Urllib3Error, OSError)
FORWARD_HEADERS = ("user-agent", "accept", "authorization", "x-request-id")


class FirstByteTimeout(Exception):
    """No response headers within the first-byte timeout."""


def backoff_delay(attempt: int, initial_s: float, multiplier: float, max_s: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with equal jitter for retry ``attempt`` (1-based)."""
    base = min(max_s, initial_s * multiplier ** (attempt - 1))
    return base / 2 + rng() * base / 2


def describe(exc: BaseException) -> str:
    """A short, operator-readable reason for a transport failure."""
    if isinstance(exc, FirstByteTimeout):
        return "timed out waiting for the first byte"
    if isinstance(exc, requests.ConnectTimeout):
        return "connect timed out"
    if isinstance(exc, requests.ReadTimeout):
        return "read timed out"
    text = str(exc)
    for marker, reason in (("Connection refused", "connection refused"),
                           ("reset by peer", "connection reset"),
                           ("RemoteDisconnected", "connection closed before a response"),
                           ("Connection aborted", "connection aborted")):
        if marker in text:
            return reason
    return text[:200] or type(exc).__name__


class Dispatcher:
    def __init__(self, pipeline: Pipeline) -> None:
        self.p = pipeline

    def start(self, ticket: Ticket, node: Node) -> None:
        """Spawn the call; returns at once."""
        started: list[bool] = []
        g = self.p.pool.spawn(self._run, ticket, node, started)

        def cancel() -> None:
            """The caller gave up: a running call cleans up in its ``finally``."""
            if started:
                g.kill()
            else:  # killed before it ran: nothing else will free its slot
                g.kill()
                self.p.registry.release(node)
                self.p.finish(ticket, "CANCELLED")

        ticket.on_cancel = cancel

    def _run(self, ticket: Ticket, node: Node, started: list[bool]) -> None:
        started.append(True)
        p = self.p
        held: Node | None = node
        tried: list[Node] = []
        last_error = "no attempt made"
        try:
            while held is not None:
                ticket.attempts += 1
                ticket.node_id = held.id
                remaining = ticket.deadline - time.monotonic()
                if remaining <= 0:
                    raise PipelineError(ErrorCode.TIMEOUT, "request timed out")
                t0 = time.monotonic()
                try:
                    resp = self._send(ticket, held, remaining)
                except (*TRANSPORT_ERRORS, FirstByteTimeout) as exc:
                    last_error = f"node {held.id}: {describe(exc)}"
                    held.record_failure(last_error, live=True)
                    log.info("upstream failure", extra={"event": "upstream_failure",
                             "node": held.id, "error": last_error, "request_id":
                             ticket.request.request_id, "attempt": ticket.attempts})
                else:
                    if resp.status_code in RETRYABLE_STATUS and self._may_retry(ticket):
                        last_error = f"node {held.id}: HTTP {resp.status_code}"
                        held.record_failure(last_error, live=True)
                        resp.close()
                    else:
                        ttfb = time.monotonic() - t0
                        if resp.status_code >= 500:
                            held.record_failure(f"HTTP {resp.status_code}", live=True)
                        else:
                            held.record_success(ttfb)
                        ticket.first_byte_at = time.monotonic()
                        self._deliver(ticket, held, resp)
                        held = None  # delivered: released by _deliver or by the stream
                        return
                tried.append(held)
                p.registry.release(held)
                held = None
                if time.monotonic() >= ticket.deadline:
                    raise PipelineError(ErrorCode.TIMEOUT, "request timed out")
                if not self._may_retry(ticket):
                    break
                held = self._next_node(ticket, tried)
                if held is None:
                    break
                p.metrics.retry(held.id)
            raise PipelineError(ErrorCode.UPSTREAM, last_error, retry_after=1.0)
        except PipelineError as err:
            p.finish(ticket, err.code.value, error=err)
        except gevent.GreenletExit:
            p.finish(ticket, "CANCELLED")
            raise
        except Exception as exc:  # a bug: answer the caller, never leave it hanging
            log.exception("dispatch failed")
            p.finish(ticket, ErrorCode.INTERNAL.value,
                     error=PipelineError(ErrorCode.INTERNAL, f"internal error: {exc}"))
        finally:
            if held is not None:
                p.registry.release(held)

    def _may_retry(self, ticket: Ticket) -> bool:
        return (ticket.attempts <= self.p.config.retry.maxRetries
                and time.monotonic() < ticket.deadline)

    def _next_node(self, ticket: Ticket, tried: list[Node]) -> Node | None:
        """Back off, then take a different node if one can serve, else a tried one."""
        retry = self.p.config.retry
        delay = backoff_delay(ticket.attempts, retry.initialBackoffMs / 1000.0,
                              retry.backoffMultiplier, retry.maxBackoffMs / 1000.0)
        delay = min(delay, max(0.0, ticket.deadline - time.monotonic()))
        if delay > 0:
            gevent.sleep(delay)
        assert ticket.model is not None
        return self.p.router.acquire(ticket.model, exclude=tried) or self.p.router.acquire(
            ticket.model)

    def _send(self, ticket: Ticket, node: Node, remaining: float) -> requests.Response:
        p = self.p
        t = p.config.timeouts
        req = ticket.request
        headers = {"Content-Type": "application/json", "X-Request-ID": req.request_id}
        for name, value in req.headers:
            if name.lower() in FORWARD_HEADERS:
                headers[name] = value
        first_byte = t.firstByteTimeoutMs / 1000.0
        # the request's own deadline is not the node's fault: a TIMEOUT, not a node failure
        timeout = (gevent.Timeout(first_byte, FirstByteTimeout()) if first_byte < remaining
                   else gevent.Timeout(remaining, PipelineError(ErrorCode.TIMEOUT,
                                                                "request timed out")))
        with timeout:
            return p.upstream.send(
                node.url, req.method, req.path, req.body, headers,
                connect_timeout=t.connectTimeoutMs / 1000.0,
                read_timeout=t.streamIdleTimeoutMs / 1000.0,
                pool_size=node.max_concurrent)

    def _deliver(self, ticket: Ticket, node: Node, resp: requests.Response) -> None:
        """Hand the reply over: a live stream, or a complete body read here."""
        p = self.p
        ctype = resp.headers.get("Content-Type", "application/json; charset=utf-8")
        if is_stream(ctype) and resp.status_code < 300:
            relay = StreamRelay(p, ticket, node, resp)
            handle = StreamHandle(resp.status_code, ctype, relay.lines(), relay.close,
                                  node.id, ticket.attempts)
            if ticket.done():  # the caller went away meanwhile
                handle.close()
                return
            ticket.on_cancel = handle.close
            ticket.set(handle)
            return
        try:
            remaining = max(0.001, ticket.deadline - time.monotonic())
            with gevent.Timeout(remaining, PipelineError(ErrorCode.TIMEOUT,
                                                         "request timed out")):
                body = resp.content
        except TRANSPORT_ERRORS as exc:
            node.record_failure(f"node {node.id}: {describe(exc)}", live=True)
            raise PipelineError(ErrorCode.UPSTREAM,
                                f"node {node.id}: {describe(exc)}") from None
        finally:
            resp.close()
            p.registry.release(node)
        result = InferenceResponse(resp.status_code, ctype, body, node.id, ticket.attempts)
        p.observe_body(ticket, body)
        ticket.set(result)
        p.finish(ticket, str(resp.status_code))


class StreamRelay:
    """Relays a node's stream line by line and cleans up exactly once."""

    def __init__(self, pipeline: Pipeline, ticket: Ticket, node: Node,
                 resp: requests.Response) -> None:
        self.p = pipeline
        self.ticket = ticket
        self.node = node
        self.resp = resp
        self.outcome = str(resp.status_code)
        self.last_line = b""
        self.complete = False  # the node's stream was read to its end
        self.closed = False

    def lines(self) -> Iterator[bytes]:
        try:
            for piece in whole_lines(self.resp.iter_content(chunk_size=None)):
                self.last_line = piece
                if piece.startswith(b'{"error"'):
                    self.node.record_failure(f"node {self.node.id}: error in stream",
                                             live=True)
                    self.outcome = "STREAM_ERROR"
                yield piece
            self.complete = True
        except TRANSPORT_ERRORS as exc:
            reason = f"node {self.node.id}: {describe(exc)} during the stream"
            self.node.record_failure(reason, live=True)
            self.outcome = "STREAM_BROKEN"
            self.complete = True
            yield self.error_line(reason)

    def error_line(self, message: str) -> bytes:
        """One final error line: native ``{"error"}`` or an OpenAI SSE error frame."""
        ep = self.ticket.endpoint
        if ep is not None and ep.openai:
            frame = {"error": {"message": message, "type": "api_error", "param": None,
                               "code": None}}
            return b"data: " + json.dumps(frame).encode() + b"\n\n"
        return json.dumps({"error": message}).encode() + b"\n"

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if not self.complete:
            self.outcome = "CANCELLED"  # the caller stopped reading: the node call is cut
        try:
            self.resp.close()
        finally:
            self.p.registry.release(self.node)
            self.p.observe_body(self.ticket, self.last_line)
            self.p.finish(self.ticket, self.outcome)
