"""Pool-wide model management: pull, create, copy, delete and blobs on every node concerned.

A client managing models through the appliance means "on the pool", so these fan out, to
every node at once (a node that is slow or down holds up only its own part):

- pull and create run as one ``ProgressRun`` whose merged progress is what one Ollama sends;
  create goes to the nodes that have its ``from`` model, or, when none has it, to every
  serving node (each pulls the base first, as Ollama does), and with ``files``/``adapters``
  to the nodes that have those blobs;
- copy and delete go to the nodes that have the model; when some fail, the error says which
  and why, and where it worked;
- a blob check answers 200 only when every serving node has the blob; an upload is streamed
  to every node that lacks it at once (``BlobTee``), never held whole.

Every bound is the idle timeout (``timeouts.pullIdleTimeoutMs``), not the request timeout:
a 40 GB pull takes as long as it takes while it makes progress. Nodes that changed have their
model lists refreshed before the answer, so the pool's ``/api/tags`` shows the change.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import gevent

from pipeline.blobtee import PIECE, BlobTee, Outcome
from pipeline.config import Config
from pipeline.modelname import canonical
from pipeline.node import Node
from pipeline.progressrun import ProgressRun, error_text
from pipeline.reasons import reason
from pipeline.registry import NodeRegistry
from pipeline.upstream import UpstreamClient

JSON_TYPE = "application/json; charset=utf-8"
DIGEST = re.compile(r"sha256[:-][0-9a-fA-F]{64}")  # as Ollama's blob routes accept it


@dataclass(frozen=True)
class NodeReply:
    node: Node
    status: int  # 0: the node could not be reached
    body: bytes
    error: str = ""
    content_type: str = JSON_TYPE

    def message(self) -> str:
        """The node's error text (``{"error"}`` body), or the transport error."""
        return self.error or error_text(self.body)


@dataclass(frozen=True)
class Combined:
    status: int
    body: bytes
    content_type: str = JSON_TYPE
    outcome: str = "success"  # for metrics: success, partial, failed, client_error


def _json(status: int, obj: Any, outcome: str) -> Combined:
    return Combined(status, json.dumps(obj).encode(), outcome=outcome)


def blob_digests(body: dict[str, Any]) -> list[str]:
    """The blobs a create names in ``files`` and ``adapters``."""
    out: list[str] = []
    for key in ("files", "adapters"):
        value = body.get(key)
        if isinstance(value, dict):
            out += [str(v) for v in value.values() if isinstance(v, str)]
    return out


class FanOut:
    def __init__(self, registry: NodeRegistry, upstream: UpstreamClient,
                 timeouts: Callable[[], tuple[float, float]],
                 refresh: Callable[[Node], None]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.timeouts = timeouts  # (connect, overall) seconds: the unload fan-out's bounds
        self.refresh = refresh  # re-read a node's model lists after a change
        self.settings: Callable[[], Config] = Config  # the live config (set by the factory)

    def serving(self) -> list[Node]:
        return [n for n in self.registry.all_nodes() if n.enabled and n.admits()]

    def having(self, model: str) -> list[Node]:
        key = canonical(model)
        return [n for n in self.serving() if n.has_model(key)]

    def _idle(self) -> tuple[float, float]:
        """(connect, idle) seconds for management calls."""
        t = self.settings().timeouts
        return t.connectTimeoutMs / 1000.0, t.pullIdleTimeoutMs / 1000.0

    def send_all(self, method: str, path: str, body: bytes | None, nodes: list[Node],
                 timeout: float | None = None, refresh: bool = True) -> list[NodeReply]:
        """Send to every node at once and wait for all; unreachable nodes give status 0.

        ``timeout`` overrides the configured overall time (a request's remaining deadline);
        ``refresh`` re-reads the model lists of the nodes that succeeded.
        """
        connect, overall = self.timeouts()
        if timeout is not None:
            overall = timeout

        def one(node: Node) -> NodeReply:
            try:
                with gevent.Timeout(overall):
                    resp = self.upstream.send(node.url, method, path, body,
                                              {"Content-Type": "application/json"}, connect,
                                              overall)
                    try:
                        return NodeReply(node, resp.status_code, resp.content, "",
                                         resp.headers.get("Content-Type", JSON_TYPE))
                    finally:
                        resp.close()
            except (Exception, gevent.Timeout) as exc:
                why = "timed out" if isinstance(exc, gevent.Timeout) else reason(exc)
                return NodeReply(node, 0, b"", why)

        jobs = [gevent.spawn(one, n) for n in nodes]
        gevent.joinall(jobs)
        replies = [j.value for j in jobs]
        if refresh:
            gevent.joinall([gevent.spawn(self.refresh, r.node) for r in replies
                            if r.status and r.status < 300])
        return replies

    def _manage(self, method: str, path: str, body: Any, nodes: list[Node],
                refresh: bool = True) -> list[NodeReply]:
        """A management call: each node bounded by the idle timeout."""
        raw = body if isinstance(body, bytes | None) else json.dumps(body).encode()
        return self.send_all(method, path, raw, nodes, timeout=self._idle()[1], refresh=refresh)

    # --- pull and create ----------------------------------------------------------------------

    def progress(self, path: str, body: dict[str, Any], nodes: list[Node]) -> ProgressRun:
        """Start a pull or create on ``nodes``; read its merged progress from the run."""
        connect, idle = self._idle()
        payload = json.dumps({**body, "stream": True}).encode()
        return ProgressRun(self.upstream, path, payload, nodes, connect, idle,
                           self.refresh).start()

    def create_targets(self, body: dict[str, Any]) -> list[Node]:
        """The nodes a create goes to: those that have ``from`` (every serving node when none
        has it: each pulls it first), narrowed to those that have the named blobs (unless
        none has them all: every node then answers the missing file itself)."""
        nodes = self.serving()
        source = body.get("from")
        if isinstance(source, str) and source:
            nodes = self.having(source) or nodes
        digests = blob_digests(body)
        if digests and nodes:
            with_blobs = self.nodes_with_blobs(digests, nodes)
            nodes = with_blobs or nodes
        return nodes

    def nodes_with_blobs(self, digests: list[str], nodes: list[Node]) -> list[Node]:
        checks = [self._check(d, nodes) for d in digests if DIGEST.fullmatch(d)]
        return [n for n in nodes if checks and all(c.get(n.id) == 200 for c in checks)]

    # --- copy, delete, warm -------------------------------------------------------------------

    def delete(self, raw: bytes, model: str) -> Combined:
        nodes = self.having(model)
        missing = _json(404, {"error": f"model '{model}' not found"}, "client_error")
        if not nodes:
            return missing
        return self._combine("delete", model, self._manage("DELETE", "/api/delete", raw, nodes),
                             missing)

    def copy(self, raw: bytes, source: str) -> Combined:
        nodes = self.having(source)
        missing = _json(404, {"error": f'model "{source}" not found'}, "client_error")
        if not nodes:
            return missing
        return self._combine("copy", source, self._manage("POST", "/api/copy", raw, nodes),
                             missing)

    @staticmethod
    def _combine(op: str, model: str, replies: list[NodeReply], missing: Combined) -> Combined:
        """One answer: 200 when every node did it (a node that no longer had the model is no
        failure); the nodes' own error when they all say the same; else 502 with each node's
        outcome."""
        ok = [r for r in replies if r.status == 200]
        gone = [r for r in replies if r.status == 404]
        failed = [r for r in replies if r.status not in (200, 404)]
        if not failed:
            return Combined(200, b"") if ok else missing
        answers = {(r.status, r.message()) for r in failed}
        if not ok and not gone and len(answers) == 1 and 400 <= failed[0].status < 500:
            return _json(failed[0].status, {"error": failed[0].message()}, "client_error")
        parts = [f"{r.node.id}: {r.message() or f'HTTP {r.status}'}" for r in failed]
        if ok:
            parts.append(f"done on {', '.join(r.node.id for r in ok)}")
        return _json(502, {"error": f"{op} '{model}' failed on {len(failed)} of "
                           f"{len(replies)} nodes: {'; '.join(parts)}"},
                     "partial" if ok else "failed")

    def delete_on(self, model: str, nodes: list[Node]) -> list[str]:
        """Delete a model on these nodes (placement); the failures (a 404 is none)."""
        replies = self._manage("DELETE", "/api/delete", {"model": model}, nodes)
        return [f"{r.node.id}: {r.message() or f'HTTP {r.status}'}" for r in replies
                if r.status not in (200, 404)]

    def warm(self, model: str, nodes: list[Node], keep_alive: str | int) -> list[str]:
        """Load a model on these nodes with ``keep_alive`` (an empty prompt loads it; an
        embedding model, which cannot generate, is loaded by an empty embed); the failures."""
        body = {"model": model, "keep_alive": keep_alive}
        replies = self._manage("POST", "/api/generate", body, nodes)
        embed = [r.node for r in replies if r.status == 400 and "does not support"
                 in r.message()]
        if embed:
            replies = [r for r in replies if r.node not in embed] + self._manage(
                "POST", "/api/embed", {**body, "input": []}, embed)
        return [f"{r.node.id}: {r.message() or f'HTTP {r.status}'}" for r in replies
                if r.status != 200]

    # --- blobs --------------------------------------------------------------------------------

    def _check(self, digest: str, nodes: list[Node]) -> dict[str, int]:
        """HEAD a blob on each node: node id -> 200, 404, ... or 0 (no answer)."""
        t = self.settings().timeouts
        replies = self.send_all("HEAD", f"/api/blobs/{digest}", None, nodes, refresh=False,
                                timeout=(t.connectTimeoutMs + t.healthCheckTimeoutMs) / 1000.0)
        return {r.node.id: r.status for r in replies}

    def blob_exists(self, digest: str) -> int:
        """200 only if every serving node has the blob, so the client uploads otherwise."""
        nodes = self.serving()
        statuses = self._check(digest, nodes).values()
        if 400 in statuses:
            return 400
        return 200 if nodes and all(s == 200 for s in statuses) else 404

    def blob_upload(self, digest: str, pieces: Iterable[bytes], length: int | None) -> Combined:
        """Stream ``pieces`` (the client's body, as it is read) to every node without the
        blob. 201 if a node created it, 200 if every node had it (the body is then not read,
        as Ollama does), 400 on a digest mismatch, 502 naming the nodes that failed."""
        nodes = self.serving()
        if not nodes:
            return _json(503, {"error": "no node available to upload to"}, "failed")
        checks = self._check(digest, nodes)
        targets = {n.id: n.url for n in nodes if checks.get(n.id) == 404}
        early = {n.id: Outcome(s, "no answer to the blob check" if not s else f"HTTP {s}")
                 for n in nodes if (s := checks.get(n.id, 0)) not in (200, 404)}
        outcomes: dict[str, Outcome] = {}
        if targets:
            tee = BlobTee(f"/api/blobs/{digest}", targets, length, self._idle()[1]).start()
            try:
                for piece in pieces:
                    if not tee.feed(piece):
                        break
            except BaseException as exc:
                tee.abort(f"upload cut: {exc or type(exc).__name__}")
                raise
            outcomes = tee.finish()
        return _blob_answer(digest, {**outcomes, **early}, had=[n.id for n in nodes
                                                               if checks.get(n.id) == 200])


def _blob_answer(digest: str, outcomes: dict[str, Outcome], had: list[str]) -> Combined:
    mismatch = [o for o in outcomes.values() if o.status == 400]
    if mismatch:
        return _json(400, {"error": mismatch[0].message}, "client_error")
    failed = {n: o for n, o in outcomes.items() if o.status not in (200, 201)}
    if failed:
        have = [n for n, o in outcomes.items() if o.status in (200, 201)] + had
        parts = [f"{n}: {o.message or f'HTTP {o.status}'}" for n, o in failed.items()]
        tail = f"; {', '.join(have)} have it" if have else ""
        return _json(502, {"error": f"blob {digest} failed on {len(failed)} node"
                           f"{'s' if len(failed) > 1 else ''}: {'; '.join(parts)}{tail}"},
                     "partial" if have else "failed")
    created = any(o.status == 201 for o in outcomes.values())
    return Combined(201 if created else 200, b"")


__all__ = ["DIGEST", "PIECE", "Combined", "FanOut", "NodeReply", "blob_digests"]
