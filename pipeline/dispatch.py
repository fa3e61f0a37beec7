"""Dispatch: the node call of each request, off the ring, retrying before the first byte.

The dispatch stage only hands the call over: to the caller's own greenlet when it is waiting
in ``Ticket.result()`` (the usual case: it runs the call and writes the reply, with no
greenlet spawned and no hop back), else to a greenlet of its own. What is retried, and
where, is the retry policy's call (``pipeline/retry.py``); a started stream is handed to a
``StreamRelay``. Once a reply has started, a failure ends it with one error line.

Ownership of the node slot is explicit: ``held`` is released in ``finally`` unless it has been
handed to a reply (released at once) or a StreamHandle (whose ``close()`` releases it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import gevent
from gevent.pool import Group

from pipeline.config import Config
from pipeline.errors import BackpressureError, ErrorCode, PipelineError
from pipeline.lease import Lease
from pipeline.ledger import Ledger
from pipeline.metrics import MetricsRegistry
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.relay import StreamRelay
from pipeline.request import InferenceResponse, StreamHandle, Ticket
from pipeline.retry import RETRYABLE_STATUS, RetryPolicy
from pipeline.routing import Router
from pipeline.unload import Unload
from pipeline.upstream import (
    TRANSPORT_ERRORS,
    FirstByteTimeout,
    UpstreamClient,
    UpstreamResponse,
    describe,
    is_stream,
)

log = logging.getLogger("ollama_lb.dispatch")

FORWARD_HEADERS = ("user-agent", "accept", "authorization", "x-request-id")


def well_formed(body: bytes) -> bool:
    """Is a complete JSON reply whole? A shape check, not a parse.

    A node's encoder writes valid JSON; what goes wrong on the way is a reply cut short, and
    a cut reply does not end as it began (``{...}`` or ``[...]``). Parsing every reply to be
    sure cost about 5 % of the appliance's CPU per request, for a case no node produces.
    """
    if not body:
        return True  # copy/delete answer 200 with an empty body
    stripped = body.strip()
    return stripped[:1] in (b"{", b"[") and stripped[-1:] in (b"}", b"]")


class Dispatcher:
    """Runs the node calls of dispatched requests, each in a greenlet of its own.

    The greenlets are not pooled: admission already bounds how many requests are in flight
    (``maxGlobalInFlight``), and a fixed-size pool would make the dispatch stage block on a
    full pool after that bound is raised by a reload.
    """

    def __init__(self, settings: Callable[[], Config], registry: NodeRegistry, router: Router,
                 ledger: Ledger, metrics: MetricsRegistry, upstream: UpstreamClient,
                 retry: RetryPolicy, unload: Unload) -> None:
        self.settings = settings  # the live config (reloads apply to the next attempt)
        self.registry = registry
        self.router = router
        self.ledger = ledger
        self.metrics = metrics
        self.upstream = upstream
        self.retry = retry
        self.unload = unload
        self.calls = Group()  # the running call greenlets
        self.streams: set[StreamRelay] = set()  # handed to callers and not yet closed
        self.requeue: Callable[[Ticket], bool] = lambda ticket: False  # wired by the pipeline
        #: sharedState (pipeline/shared): may the node take this lease's request across
        #: instances? Runs here, off the ring, because it may ask Redis. None: no gate.
        self.admit: Callable[[Lease], bool] | None = None
        #: placement (pipeline/reconciler.py): the body as sent, with a model's configured
        #: keep_alive added when the client gave none. None: bodies go byte for byte.
        self.prepare_body: Callable[[str, bytes, str], bytes] | None = None

    def start(self, ticket: Ticket, lease: Lease) -> None:
        """Spawn the call; returns at once. The lease is the call's to give back.

        The model counts as loaded on the node from now on: the node will load it for this
        request, so the next requests for it should follow rather than start cold loads of
        their own elsewhere. (/api/ps discovery corrects this if the request fails.)
        """
        if ticket.endpoint is not None and ticket.endpoint.loads_model and ticket.model:
            ticket.cold = ticket.model not in lease.node.loaded
            lease.node.mark_loaded(ticket.model)
        if ticket.hand(self._run, lease, self._drop):
            return  # the caller's greenlet runs the call: no greenlet of its own, no hop back
        g = self.calls.spawn(self._run, ticket, lease)

        def cancel() -> None:
            """The caller gave up. A call that ran gives everything back in its ``finally``;
            one killed before it ran never will, so do it here (both are idempotent)."""
            g.kill()
            self.registry.release(lease)
            self.ledger.finish(ticket, "CANCELLED")

        ticket.on_cancel = cancel

    def _drop(self, ticket: Ticket, lease: Lease) -> None:
        """A call handed to its caller, who left before starting it: give everything back."""
        self.registry.release(lease)
        self.ledger.finish(ticket, "CANCELLED")

    def _run(self, ticket: Ticket, lease: Lease) -> None:
        held: Lease | None = lease  # ours to give back until handed to a reply or stream
        tried: list[Node] = []
        last_error = "no attempt made"
        try:
            while held is not None:
                if self.admit is not None and not self.admit(held):
                    self.registry.release(held)  # full across instances: wait for a slot
                    held = None
                    if self.requeue(ticket):
                        return
                    raise BackpressureError("server busy, please try again.  queue full")
                ticket.attempts += 1
                ticket.node_id = held.node.id
                remaining = ticket.deadline - time.monotonic()
                if remaining <= 0:
                    raise PipelineError(ErrorCode.TIMEOUT, "request timed out")
                failure = self._attempt(ticket, held, remaining, tried)
                if failure is None:
                    held = None  # handed over: released by the reply or its stream
                    return
                last_error = failure
                tried.append(held.node)
                self.registry.release(held)
                held = None
                if not self.retry.may_retry(ticket):
                    break
                held = self.retry.next_node(ticket, tried)
                if held is not None:
                    self.metrics.retry(held.node.id)
                elif self.requeue(ticket):
                    return  # every node is busy: wait for capacity like any other request
            if time.monotonic() >= ticket.deadline:
                raise PipelineError(ErrorCode.TIMEOUT, "request timed out")
            raise PipelineError(ErrorCode.UPSTREAM, last_error, retry_after=1.0)
        except PipelineError as err:
            self.ledger.finish(ticket, err.code.value, error=err)
        except gevent.GreenletExit:
            self.ledger.finish(ticket, "CANCELLED")
            raise
        except Exception as exc:  # a bug: answer the caller, never leave it hanging
            log.exception("dispatch failed")
            self.ledger.finish(ticket, ErrorCode.INTERNAL.value,
                               error=PipelineError(ErrorCode.INTERNAL, f"internal error: {exc}"))
        finally:
            if held is not None:
                self.registry.release(held)  # no verdict recorded: the trial comes back too

    def _attempt(self, ticket: Ticket, lease: Lease, remaining: float,
                 tried: list[Node]) -> str | None:
        """One try on the leased node: None once the reply is handed over, else why it failed.

        A failure returned here happened before any byte reached the caller, so it may be
        retried; the caller still holds (and releases) the lease.
        """
        node = lease.node
        t0 = time.monotonic()
        try:
            resp = self._send(ticket, node, remaining)
        except (*TRANSPORT_ERRORS, FirstByteTimeout) as exc:
            return self._failed(ticket, lease, describe(exc))
        status = resp.status_code
        ctype = resp.headers.get("Content-Type", "application/json; charset=utf-8")
        if status == 404 and self._stale_model(ticket, node, tried):
            resp.close()
            return f"node {node.id}: model not found there (stale model list)"
        if status in RETRYABLE_STATUS and self.retry.may_retry(ticket):
            resp.close()
            return self._failed(ticket, lease, f"HTTP {status}")
        if is_stream(ctype) and status < 300:
            self._succeeded(ticket, lease, time.monotonic() - t0)
            self._hand_over_stream(ticket, lease, resp, ctype)
            return None
        # A complete reply is read whole before anything is sent, so a broken one is retried.
        # (The socket's idle timeout bounds the read: the headers are in, the body follows.)
        try:
            body = resp.content
        except TRANSPORT_ERRORS as exc:
            return self._failed(ticket, lease, f"{describe(exc)} while reading the reply")
        finally:
            resp.close()
        if status == 200 and "json" in ctype and not well_formed(body):
            return self._failed(ticket, lease, "malformed JSON reply")
        if status >= 500:
            lease.failed(f"node {node.id}: HTTP {status}")
            ticket.first_byte_at = time.monotonic()
        else:
            self._succeeded(ticket, lease, time.monotonic() - t0)
        self.registry.release(lease)
        self.ledger.observe_body(ticket, body)
        ticket.set(InferenceResponse(status, ctype, body, node.id, ticket.attempts))
        self.ledger.finish(ticket, str(status))
        return None

    def _failed(self, ticket: Ticket, lease: Lease, reason: str) -> str:
        full = f"node {lease.node.id}: {reason}"
        lease.failed(full)
        log.info("upstream failure", extra={"event": "upstream_failure", "node": lease.node.id,
                                            "error": full, "attempt": ticket.attempts,
                                            "request_id": ticket.request.request_id})
        return full

    def _succeeded(self, ticket: Ticket, lease: Lease, ttfb: float) -> None:
        ticket.first_byte_at = time.monotonic()
        lease.succeeded(ttfb)
        if ticket.cold and ticket.stream:  # a streamed first byte: load + prefill, not decode
            self.router.observe_cold_load(ttfb)
        if ticket.endpoint is not None and ticket.endpoint.loads_model and ticket.model:
            lease.node.mark_loaded(ticket.model)

    def _hand_over_stream(self, ticket: Ticket, lease: Lease, resp: UpstreamResponse,
                          ctype: str) -> None:
        relay = StreamRelay(ticket, lease, resp, self.ledger, self.registry.release,
                            self.streams)
        relay.watch_idle(self.settings().timeouts.streamIdleTimeoutMs / 1000.0)
        handle = StreamHandle(resp.status_code, ctype, relay.lines(), relay.close,
                              lease.node.id, ticket.attempts, relay.pump)
        if ticket.done():  # the caller went away meanwhile
            handle.close()
            return
        ticket.on_cancel = handle.close
        ticket.set(handle)

    def _stale_model(self, ticket: Ticket, node: Node, tried: list[Node]) -> bool:
        """A 404 from a node we believed had the model, or knew nothing about: forget it
        there, and try once on another node known to have it.

        A node whose model list is unknown (discovery failed or has not run yet) is offered
        every model, so its 404 means "not here", not "nowhere". A configured model is the
        operator's word, so its 404 is the node's answer.
        """
        model = ticket.model or ""
        if model in node.static_models:
            return False
        if node.installed is not None:
            if model not in node.installed:
                return False
            node.installed.discard(model)
        node.loaded.discard(model)
        others = [n for n in self.registry.all_nodes()
                  if n is not node and n not in tried and n.has_model(model)
                  and (n.installed is not None or bool(n.static_models))]
        return bool(others) and time.monotonic() < ticket.deadline

    def fan_out(self, ticket: Ticket) -> None:
        """An unload: sent to every node with the model, answered once."""
        g = self.calls.spawn(self.unload.run, ticket)
        ticket.on_cancel = g.kill

    def _send(self, ticket: Ticket, node: Node, remaining: float) -> UpstreamResponse:
        t = self.settings().timeouts
        req = ticket.request
        headers = {"Content-Type": "application/json", "X-Request-ID": req.request_id}
        for name, value in req.headers:
            if name.lower() in FORWARD_HEADERS:
                headers[name] = value
        # Ollama sends a non-streamed reply's headers only when generation ends, so for those
        # the "first byte" is the whole answer: only the request's deadline bounds them.
        first_byte = t.firstByteTimeoutMs / 1000.0 if ticket.stream else float("inf")
        # the request's own deadline is not the node's fault: a TIMEOUT, not a node failure
        timeout = (gevent.Timeout(first_byte, FirstByteTimeout()) if first_byte < remaining
                   else gevent.Timeout(remaining, PipelineError(ErrorCode.TIMEOUT,
                                                                "request timed out")))
        body = req.body if self.prepare_body is None else self.prepare_body(
            req.path, req.body, ticket.model or "")
        with timeout:
            resp = self.upstream.send(
                node.url, req.method, req.path, body, headers,
                connect_timeout=t.connectTimeoutMs / 1000.0,
                read_timeout=None,  # the one timer above bounds the wait, not one per read
                pool_size=node.max_concurrent)
        # The headers are in: from here on, silence means a stalled stream, not a cold load.
        resp.set_read_timeout(t.streamIdleTimeoutMs / 1000.0)
        return resp
