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
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error

from pipeline.errors import ErrorCode, PipelineError
from pipeline.request import InferenceResponse, StreamHandle, Ticket
from pipeline.upstream import UpstreamResponse, is_stream, whole_lines

if TYPE_CHECKING:
    from pipeline.node import Node
    from pipeline.pipeline import Pipeline

log = logging.getLogger("ollama_lb.dispatch")

RETRYABLE_STATUS = frozenset({502, 503, 504})
TRANSPORT_ERRORS = (Urllib3Error, OSError)
FORWARD_HEADERS = ("user-agent", "accept", "authorization", "x-request-id")


class FirstByteTimeout(Exception):
    """No response headers within the first-byte timeout."""


def well_formed(body: bytes) -> bool:
    """Is a complete JSON reply parseable? (Large bodies: a cheap shape check only.)"""
    if not body:
        return True  # copy/delete answer 200 with an empty body
    if len(body) > 256 * 1024:
        stripped = body.strip()
        return stripped[:1] in (b"{", b"[") and stripped[-1:] in (b"}", b"]")
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def backoff_delay(attempt: int, initial_s: float, multiplier: float, max_s: float,
                  rng: Callable[[], float] = random.random) -> float:
    """Exponential backoff with equal jitter for retry ``attempt`` (1-based)."""
    base = min(max_s, initial_s * multiplier ** (attempt - 1))
    return base / 2 + rng() * base / 2


def describe(exc: BaseException) -> str:
    """A short, operator-readable reason for a transport failure."""
    if isinstance(exc, FirstByteTimeout):
        return "timed out waiting for the first byte"
    if isinstance(exc, ConnectTimeoutError):
        return "connect timed out"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "read timed out"
    text = str(exc)
    for marker, reason in (("Read timed out", "read timed out"),
                           ("Connection refused", "connection refused"),
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
        """Spawn the call; returns at once.

        The model counts as loaded on the node from now on: the node will load it for this
        request, so the next requests for it should follow rather than start cold loads of
        their own elsewhere. (/api/ps discovery corrects this if the request fails.)
        """
        if ticket.endpoint is not None and ticket.endpoint.loads_model and ticket.model:
            node.mark_loaded(ticket.model)
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
                failure = self._attempt(ticket, held, remaining, tried)
                if failure is None:
                    held = None  # handed over: released by the reply or its stream
                    return
                last_error = failure
                tried.append(held)
                p.registry.release(held)
                held = None
                if time.monotonic() >= ticket.deadline:
                    raise PipelineError(ErrorCode.TIMEOUT, "request timed out")
                if not self._may_retry(ticket):
                    break
                held = self._next_node(ticket, tried)
                if held is not None:
                    p.metrics.retry(held.id)
                elif p.requeue(ticket):
                    return  # every node is busy: wait for capacity like any other request
            raise PipelineError(ErrorCode.UPSTREAM, last_error, retry_after=1.0)
        except PipelineError as err:
            p.finish(ticket, err.code.value, error=err)
        except gevent.GreenletExit:
            if held is not None:
                held.breaker.release_trial()  # no verdict: let another trial through
            p.finish(ticket, "CANCELLED")
            raise
        except Exception as exc:  # a bug: answer the caller, never leave it hanging
            log.exception("dispatch failed")
            p.finish(ticket, ErrorCode.INTERNAL.value,
                     error=PipelineError(ErrorCode.INTERNAL, f"internal error: {exc}"))
        finally:
            if held is not None:
                p.registry.release(held)

    def _attempt(self, ticket: Ticket, node: Node, remaining: float,
                 tried: list[Node]) -> str | None:
        """One try on ``node``: None once the reply is handed over, else why it failed.

        A failure returned here happened before any byte reached the caller, so it may be
        retried; the caller still holds (and releases) the node slot.
        """
        t0 = time.monotonic()
        try:
            resp = self._send(ticket, node, remaining)
        except (*TRANSPORT_ERRORS, FirstByteTimeout) as exc:
            return self._failed(ticket, node, describe(exc))
        status = resp.status_code
        ctype = resp.headers.get("Content-Type", "application/json; charset=utf-8")
        if status == 404 and self._stale_model(ticket, node, tried):
            resp.close()
            return f"node {node.id}: model not found there (stale model list)"
        if status in RETRYABLE_STATUS and self._may_retry(ticket):
            resp.close()
            return self._failed(ticket, node, f"HTTP {status}")
        if is_stream(ctype) and status < 300:
            self._succeeded(ticket, node, time.monotonic() - t0)
            self._hand_over_stream(ticket, node, resp, ctype)
            return None
        # A complete reply is read whole before anything is sent, so a broken one is retried.
        # (The socket's idle timeout bounds the read: the headers are in, the body follows.)
        try:
            body = resp.content
        except TRANSPORT_ERRORS as exc:
            return self._failed(ticket, node, f"{describe(exc)} while reading the reply")
        finally:
            resp.close()
        if status == 200 and "json" in ctype and not well_formed(body):
            return self._failed(ticket, node, "malformed JSON reply")
        if status >= 500:
            node.record_failure(f"node {node.id}: HTTP {status}", live=True)
            ticket.first_byte_at = time.monotonic()
        else:
            self._succeeded(ticket, node, time.monotonic() - t0)
        self.p.registry.release(node)
        self.p.observe_body(ticket, body)
        ticket.set(InferenceResponse(status, ctype, body, node.id, ticket.attempts))
        self.p.finish(ticket, str(status))
        return None

    def _failed(self, ticket: Ticket, node: Node, reason: str) -> str:
        full = f"node {node.id}: {reason}"
        node.record_failure(full, live=True)
        log.info("upstream failure", extra={"event": "upstream_failure", "node": node.id,
                                            "error": full, "attempt": ticket.attempts,
                                            "request_id": ticket.request.request_id})
        return full

    def _succeeded(self, ticket: Ticket, node: Node, ttfb: float) -> None:
        ticket.first_byte_at = time.monotonic()
        node.record_success(ttfb)
        if ticket.endpoint is not None and ticket.endpoint.loads_model and ticket.model:
            node.mark_loaded(ticket.model)

    def _hand_over_stream(self, ticket: Ticket, node: Node, resp: UpstreamResponse,
                          ctype: str) -> None:
        relay = StreamRelay(self.p, ticket, node, resp)
        handle = StreamHandle(resp.status_code, ctype, relay.lines(), relay.close, node.id,
                              ticket.attempts)
        if ticket.done():  # the caller went away meanwhile
            handle.close()
            return
        ticket.on_cancel = handle.close
        ticket.set(handle)

    def _stale_model(self, ticket: Ticket, node: Node, tried: list[Node]) -> bool:
        """A 404 from a node we believed had the model: forget it there, try another once.

        Only a discovered model can be stale (a configured one is the operator's word), and
        only one such retry is made per request.
        """
        model = ticket.model or ""
        if node.installed is None or model not in node.installed or model in node.static_models:
            return False
        node.installed.discard(model)
        node.loaded.discard(model)
        others = [n for n in self.p.registry.all_nodes()
                  if n is not node and n not in tried and n.has_model(model)]
        return bool(others) and time.monotonic() < ticket.deadline

    def fan_out(self, ticket: Ticket) -> None:
        """Send one request to every node that has the model (unload); answer once."""
        g = self.p.pool.spawn(self._fan_out, ticket)
        ticket.on_cancel = g.kill

    def _fan_out(self, ticket: Ticket) -> None:
        p = self.p
        model = ticket.model or ""
        req = ticket.request
        nodes = p.fan_out.having(model)
        replies = p.fan_out.send_all(req.method, req.path, req.body, nodes, refresh=False,
                                     timeout=max(0.001, ticket.deadline - time.monotonic()))
        answered = [r for r in replies if r.status]
        for r in answered:
            if r.status == 200:
                r.node.loaded.discard(model)
        ticket.attempts = len(nodes)
        ok = [r for r in answered if r.status == 200]
        best = ok[0] if ok else (answered[0] if answered else None)
        if best is None:
            err = PipelineError(ErrorCode.NO_AVAILABLE_NODE,
                                f"no node could unload model '{ticket.model_raw}'",
                                retry_after=1.0)
            p.finish(ticket, err.code.value, error=err)
            return
        ticket.node_id = best.node.id if len(nodes) == 1 else "all"
        ticket.set(InferenceResponse(best.status, best.content_type, best.body, ticket.node_id,
                                     len(nodes)))
        p.finish(ticket, str(best.status))

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

    def _send(self, ticket: Ticket, node: Node, remaining: float) -> UpstreamResponse:
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
            resp = p.upstream.send(
                node.url, req.method, req.path, req.body, headers,
                connect_timeout=t.connectTimeoutMs / 1000.0,
                read_timeout=min(first_byte, remaining) + 1.0,
                pool_size=node.max_concurrent)
        # The headers are in: from here on, silence means a stalled stream, not a cold load.
        resp.set_read_timeout(t.streamIdleTimeoutMs / 1000.0)
        return resp


class StreamRelay:
    """Relays a node's stream line by line and cleans up exactly once."""

    def __init__(self, pipeline: Pipeline, ticket: Ticket, node: Node,
                 resp: UpstreamResponse) -> None:
        self.p = pipeline
        self.ticket = ticket
        self.node = node
        self.resp = resp
        self.outcome = str(resp.status_code)
        self.ndjson = "ndjson" in resp.headers.get("Content-Type", "")
        self.last_line = b""
        self.complete = False  # the node's stream was read to its end
        self.closed = False
        self.cut_reason: str | None = None  # set by cut(): why the appliance ended the stream
        pipeline.streams.add(self)

    def lines(self) -> Iterator[bytes]:
        try:
            for piece in whole_lines(self.resp.iter_content()):
                self.last_line = piece
                if self.ndjson and not (piece.startswith(b"{") and piece.endswith(b"}\n")):
                    reason = f"node {self.node.id}: malformed line in the stream"
                    self.node.record_failure(reason, live=True)
                    self.outcome = "STREAM_BROKEN"
                    self.complete = True
                    yield self.error_line(reason)
                    return
                if piece.startswith(b'{"error"'):
                    self.node.record_failure(f"node {self.node.id}: error in stream",
                                             live=True)
                    self.outcome = "STREAM_ERROR"
                yield piece
            self.complete = True
        except TRANSPORT_ERRORS as exc:
            self.complete = True
            if self.cut_reason is not None:  # the appliance ended it: not the node's fault
                self.outcome = "CUT"
                yield self.error_line(self.cut_reason)
                return
            reason = f"node {self.node.id}: {describe(exc)} during the stream"
            self.node.record_failure(reason, live=True)
            self.outcome = "STREAM_BROKEN"
            yield self.error_line(reason)

    def cut(self, reason: str) -> None:
        """End the stream from outside (shutdown): the reader gets one error line, then EOF.

        Closing the upstream connection wakes the greenlet blocked reading it with an error,
        which ``lines()`` turns into the error line.
        """
        if self.closed or self.complete:
            return
        self.cut_reason = reason
        self.resp.raw.close()

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
        self.p.streams.discard(self)
        if not self.complete:
            self.outcome = "CANCELLED"  # the caller stopped reading: the node call is cut
        try:
            self.resp.close()
        finally:
            self.p.registry.release(self.node)
            self.p.observe_body(self.ticket, self.last_line)
            self.p.finish(self.ticket, self.outcome)
