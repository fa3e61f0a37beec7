"""One pull or create running on several nodes at once, read into one merged progress stream.

A reader greenlet per node sends the request (always ``stream: true``, so that progress keeps
coming) and feeds each line to a ``ProgressMerge``; the caller reads ``lines()``, the merged
NDJSON, or waits for the end with ``join()``. What bounds it is silence, not length: a node
that sends nothing for the idle timeout fails (``no progress for 300 s``) and the others carry
on; a node that cannot be reached fails at once. Nothing here waits on one node for another.

A caller that goes away (``abandon``, safe from a hub callback) or a shutdown past the drain
bound (``cut``) ends every node's request by closing its connection, which is how Ollama is
told to stop a pull.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from http.client import HTTPException
from typing import Any

from gevent.event import Event
from gevent.pool import Group

from pipeline.node import Node
from pipeline.progress import Line, ProgressMerge
from pipeline.reasons import reason
from pipeline.upstream import TRANSPORT_ERRORS, UpstreamClient, UpstreamResponse

HEADERS = {"Content-Type": "application/json", "Accept": "application/x-ndjson"}


def ndjson(line: Line) -> bytes:
    return json.dumps(line).encode() + b"\n"


def error_text(body: bytes) -> str:
    """A node's ``{"error": ...}`` reply as text (or the start of whatever it sent)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200] or "empty reply"
    if isinstance(data, dict) and data.get("error"):
        return str(data["error"])
    return json.dumps(data)[:200]


class ProgressRun:
    """The readers of one operation on ``nodes`` and the merged stream they make."""

    def __init__(self, upstream: UpstreamClient, path: str, body: bytes, nodes: list[Node],
                 connect_s: float, idle_s: float, refresh: Callable[[Node], None]) -> None:
        self.upstream = upstream
        self.path = path
        self.body = body
        self.nodes = list(nodes)
        self.connect_s = connect_s
        self.idle_s = idle_s
        self.refresh = refresh  # a node that succeeded: its model lists, before the end
        self.merge = ProgressMerge([n.id for n in self.nodes])
        self.cut_reason: str | None = None  # set by cut(): the stream ends with this error
        self.closed = False
        self.abandoned = False  # the caller went away (abandon)
        self._changed = Event()
        self._readers = Group()

    def start(self) -> ProgressRun:
        for node in self.nodes:
            self._readers.spawn(self._read, node)
        return self

    # --- waiting ------------------------------------------------------------------------------

    def _finished(self) -> bool:
        return self.merge.over or self.closed or self.cut_reason is not None

    def _wait_for(self, condition: Callable[[], bool]) -> None:
        while not condition():
            self._changed.clear()
            if condition():
                return
            self._changed.wait()

    def wait_started(self) -> None:
        """Until one node streams (or every one has answered without streaming)."""
        self._wait_for(lambda: self.merge.any_started or self._finished())

    def join(self) -> None:
        """Until every node has succeeded or failed."""
        self._wait_for(self._finished)

    def lines(self) -> Iterator[bytes]:
        """The merged stream: lines as they become ready, then success or one error line."""
        while not self.closed:
            self._changed.clear()
            over = self.merge.over or self.cut_reason is not None
            out = self.merge.ready()
            if self.cut_reason is not None:
                out.append({"error": self.cut_reason})
            elif over:
                out.append(self.merge.final())
            if out:
                yield b"".join(ndjson(line) for line in out)
            if over:
                return
            self._changed.wait()

    # --- ending it early ----------------------------------------------------------------------

    def abandon(self, reason: str = "the client closed the connection") -> None:
        """The caller is gone: stop every node's request. Never blocks (hub callbacks)."""
        for node_id, state in self.merge.nodes.items():
            if state.running:
                self.merge.failed(node_id, f"cancelled: {reason}")
        self.abandoned = self.closed = True
        self._readers.kill(block=False)
        self._changed.set()

    def cut(self, reason: str) -> None:
        """Shutdown past the drain bound: the stream ends with ``reason`` as its error."""
        if self.closed or self.merge.over:
            return
        self.cut_reason = reason
        for node_id, state in self.merge.nodes.items():
            if state.running:
                self.merge.failed(node_id, reason)
        self._readers.kill(block=False)
        self._changed.set()

    def close(self) -> None:
        """Stop whatever still runs and wait (briefly) for the readers to let go."""
        self.closed = True
        self._readers.kill(block=True, timeout=2)
        self._changed.set()

    # --- one node -----------------------------------------------------------------------------

    def _read(self, node: Node) -> None:
        try:
            self._follow(node)
        except (*TRANSPORT_ERRORS, HTTPException) as exc:
            self._lost(node, exc)
        finally:
            self._changed.set()

    def _lost(self, node: Node, exc: BaseException) -> None:
        why = reason(exc)
        if why == "read timed out":
            why = f"no progress for {self.idle_s:g} s"
        if self.merge.nodes[node.id].started:
            self.merge.failed(node.id, f"{why} during the stream")
        else:
            self.merge.refused(node.id, 0, why)

    def _follow(self, node: Node) -> None:
        resp = self.upstream.send(node.url, "POST", self.path, self.body, HEADERS,
                                  self.connect_s, self.idle_s)
        try:
            if resp.status_code != 200 or "ndjson" not in resp.headers.get("Content-Type", ""):
                self._whole(node, resp)
                return
            self.merge.started(node.id)
            self._changed.set()
            resp.set_read_timeout(self.idle_s)
            for line in _lines(resp):
                if not self._take(node, line):
                    return
            if self.merge.nodes[node.id].last_status != "success":
                self.merge.failed(node.id, "the stream ended before success")
                return
            self.refresh(node)  # the pool's lists show the model before the client's next call
            self.merge.succeeded(node.id)
        finally:
            resp.close()

    def _whole(self, node: Node, resp: UpstreamResponse) -> None:
        """A reply that is not a stream: an error before any progress, or one final object."""
        body = resp.content
        if resp.status_code == 200:
            try:
                data: Any = json.loads(body)
            except ValueError:
                data = None
            if isinstance(data, dict) and data.get("status") == "success":
                self.merge.started(node.id)
                self.refresh(node)
                self.merge.succeeded(node.id)
                return
        self.merge.refused(node.id, resp.status_code, error_text(body))

    def _take(self, node: Node, line: bytes) -> bool:
        """One line of a node's stream; False once the node has failed."""
        try:
            data = json.loads(line)
        except ValueError:
            data = None
        if not isinstance(data, dict):
            self.merge.failed(node.id, "malformed line in the stream")
            return False
        if "error" in data:
            self.merge.failed(node.id, str(data["error"]))
            return False
        self.merge.take(node.id, data)
        self._changed.set()
        return True


def _lines(resp: UpstreamResponse) -> Iterator[bytes]:
    """A node's stream as complete lines (blank ones skipped)."""
    pending = b""
    for chunk in resp.iter_content():
        pending += chunk
        *whole, pending = pending.split(b"\n")
        for line in whole:
            if line.strip():
                yield line
    if pending.strip():
        yield pending
