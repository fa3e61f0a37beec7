"""Merging the progress streams of one pull (or create) running on several nodes at once.

A client pulling through the appliance should see what one Ollama shows: ``pulling manifest``,
one progress line per layer (``digest``, ``total``, ``completed``), ``verifying sha256
digest``, ``writing manifest``, and one ``success`` at the very end. Here every layer's
``total`` and ``completed`` are summed over the target nodes, so a bar reaches 100 % when the
layer is on every node. ``total`` is fixed the first time a layer is shown (the Go CLI sizes
its bar from the first line) and ``completed`` only grows (each node's own value is kept at
its maximum and the sum is capped at the total).

Status lines without a digest are the pool's: one is shown once every node still running has
reached it (a node that fails or finishes no longer holds it back), in the order they were
first seen; the n-th ``writing manifest`` of a create that pulled its base first is shown
once. A node's own ``success`` is never relayed: the merged stream ends with ``success`` only
when every target succeeded, otherwise with one error naming the nodes that failed and why.

This module is the state only (no I/O): ``pipeline.fanout`` feeds it what each node sends.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

Line = dict[str, Any]


@dataclass
class _Node:
    """One target's progress as it reported it."""

    id: str
    started: bool = False  # answered 200 with a stream
    succeeded: bool = False
    error: str | None = None  # why it failed (before or during its stream)
    status_code: int = 0  # the HTTP status of a refusal before any stream (0: unreachable)
    last_status: str = ""
    seen: Counter[str] = field(default_factory=Counter)  # status lines by text, counted
    layers: dict[str, tuple[int, int | None]] = field(default_factory=dict)  # total, completed

    @property
    def running(self) -> bool:
        return self.error is None and not self.succeeded


@dataclass
class _Layer:
    status: str  # the latest wording ("pulling 74701a8c35f6")
    size: int  # one node's total for it
    total: int | None = None  # fixed when first shown
    shown: tuple[int, int | None] | None = None  # (total, completed) last emitted


class ProgressMerge:
    """The merged progress of one operation on ``node_ids``; ``ready()`` gives new lines."""

    def __init__(self, node_ids: list[str]) -> None:
        self.nodes = {node_id: _Node(node_id) for node_id in node_ids}
        self._layers: dict[str, _Layer] = {}  # by digest, in first-seen order
        self._statuses: list[tuple[str, int]] = []  # (text, n-th occurrence), first-seen order
        self._emitted = 0  # statuses of _statuses already shown
        self._order: list[tuple[str, Any]] = []  # ("layer", digest) | ("status", index)

    # --- what the nodes report ----------------------------------------------------------------

    def started(self, node_id: str) -> None:
        self.nodes[node_id].started = True

    def refused(self, node_id: str, status_code: int, message: str) -> None:
        """The node answered an error (or could not be reached) before any stream."""
        node = self.nodes[node_id]
        node.status_code, node.error = status_code, message

    def failed(self, node_id: str, message: str) -> None:
        node = self.nodes[node_id]
        if node.running:
            node.error = message

    def succeeded(self, node_id: str) -> None:
        node = self.nodes[node_id]
        if node.running:
            node.succeeded = True

    def take(self, node_id: str, line: Line) -> None:
        """One progress object from a node's stream."""
        node = self.nodes[node_id]
        status = line.get("status")
        status = status if isinstance(status, str) else ""
        digest = line.get("digest")
        if isinstance(digest, str) and digest and isinstance(line.get("total"), int):
            self._take_layer(node, digest, status, line)
            return
        if not status:
            return
        node.last_status = status
        if status == "success":  # the end is the merge's to say, once
            return
        node.seen[status] += 1
        key = (status, node.seen[status])
        if key not in self._statuses:
            self._statuses.append(key)
            self._order.append(("status", len(self._statuses) - 1))

    def _take_layer(self, node: _Node, digest: str, status: str, line: Line) -> None:
        total = int(line["total"])
        done = line.get("completed")
        old = node.layers.get(digest)
        completed = done if isinstance(done, int) else None
        if old is not None and old[1] is not None:
            completed = max(old[1], completed or 0)
        node.layers[digest] = (total, completed)
        node.last_status = status
        layer = self._layers.get(digest)
        if layer is None:
            self._layers[digest] = _Layer(status or f"pulling {digest[7:19]}", total)
            self._order.append(("layer", digest))
        elif status:
            layer.status = status

    # --- what the client sees -----------------------------------------------------------------

    @property
    def any_started(self) -> bool:
        return any(n.started for n in self.nodes.values())

    @property
    def over(self) -> bool:
        """Every target has succeeded or failed."""
        return not any(n.running for n in self.nodes.values())

    @property
    def ok(self) -> bool:
        return bool(self.nodes) and all(n.succeeded for n in self.nodes.values())

    def ready(self) -> list[Line]:
        """The lines to send now: layers whose sums moved, statuses every runner reached."""
        out: list[Line] = []
        for kind, key in self._order:
            if kind == "layer":
                line = self._layer_line(key)
                if line is not None:
                    out.append(line)
            elif key == self._emitted and self._reached(*self._statuses[key]):
                self._emitted += 1
                out.append({"status": self._statuses[key][0]})
        return out

    def _reached(self, status: str, nth: int) -> bool:
        return all(n.seen[status] >= nth for n in self.nodes.values()
                   if n.started and n.running)

    def _layer_line(self, digest: str) -> Line | None:
        layer = self._layers[digest]
        reports = [n.layers.get(digest) for n in self.nodes.values()]
        if layer.total is None:  # every target not known to have failed pulls this layer
            layer.total = sum(r[0] if r else layer.size for r, n in zip(
                reports, self.nodes.values(), strict=True) if r or n.running)
        done = [r[1] for r in reports if r and r[1] is not None]
        completed = min(sum(done), layer.total) if done else None
        if layer.shown == (layer.total, completed):
            return None
        layer.shown = (layer.total, completed)
        line: Line = {"status": layer.status, "digest": digest, "total": layer.total}
        if completed is not None:
            line["completed"] = completed
        return line

    def final(self) -> Line:
        """The last line: success when every target succeeded, else the failures."""
        return {"status": "success"} if self.ok else {"error": self.failure()}

    def failure(self) -> str:
        """The failed nodes and why, grouped by reason: ``n1: connection reset; n2, n3:
        pull model manifest: file does not exist (done on n0)``."""
        by_reason: dict[str, list[str]] = {}
        for node in self.nodes.values():
            if node.error is not None:
                by_reason.setdefault(node.error, []).append(node.id)
        text = "; ".join(f"{', '.join(ids)}: {why}" for why, ids in by_reason.items())
        done = [n.id for n in self.nodes.values() if n.succeeded]
        return f"{text} (done on {', '.join(done)})" if done else text or "no node answered"

    def refusal(self) -> tuple[int, str]:
        """Status and message when no node started: what one Ollama would have answered if
        every node said the same (``400 invalid model name``), else 502 and every reason."""
        errors = {(n.status_code, n.error) for n in self.nodes.values()}
        if len(errors) == 1:
            status, message = next(iter(errors))
            if status:
                return status, message or ""
        statuses = {n.status_code for n in self.nodes.values()}
        status = statuses.pop() if len(statuses) == 1 else 502
        return (status if 400 <= status < 500 else 502), self.failure()

    def fraction(self) -> float | None:
        """How much of every layer shown so far is on every node (0..1), for status pages."""
        totals = [layer.shown for layer in self._layers.values() if layer.shown]
        whole = sum(t for t, _ in totals)
        return sum(c or 0 for _, c in totals) / whole if whole else None

    def outcomes(self) -> dict[str, str]:
        """Per node: ``success``, its error, or ``running``."""
        return {n.id: "success" if n.succeeded else n.error or "running"
                for n in self.nodes.values()}
