"""Pool-wide model management: pull, create, copy, delete and blobs on every node concerned.

A client managing models through the appliance means "on the pool", so these fan out: pull
and create go to every serving node (create with ``from`` to the nodes that have the source),
copy and delete to the nodes that have the model, blobs to every node.
Results are combined into the single answer one Ollama would give, and the nodes' model lists
are refreshed afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent

from pipeline.modelname import canonical
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.upstream import UpstreamClient

JSON_TYPE = "application/json; charset=utf-8"


@dataclass(frozen=True)
class NodeReply:
    node: Node
    status: int  # 0: the node could not be reached
    body: bytes
    error: str = ""
    content_type: str = JSON_TYPE

    def message(self) -> str:
        """The node's error text (``{"error"}`` body), or the transport error."""
        if self.error:
            return self.error
        try:
            data = json.loads(self.body)
            return str(data.get("error") or data.get("status") or "")
        except ValueError:
            return self.body.decode(errors="replace")[:200]


@dataclass(frozen=True)
class Combined:
    status: int
    body: bytes
    content_type: str = JSON_TYPE


def _json(status: int, obj: Any) -> Combined:
    return Combined(status, json.dumps(obj).encode())


class FanOut:
    def __init__(self, registry: NodeRegistry, upstream: UpstreamClient,
                 timeouts: Callable[[], tuple[float, float]],
                 refresh: Callable[[Node], None]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.timeouts = timeouts  # (connect, overall) seconds
        self.refresh = refresh  # re-read a node's model lists after a change

    def serving(self) -> list[Node]:
        return [n for n in self.registry.all_nodes() if n.enabled and n.admits()]

    def having(self, model: str) -> list[Node]:
        key = canonical(model)
        return [n for n in self.serving() if n.has_model(key)]

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
                return NodeReply(node, 0, b"", f"node {node.id}: {type(exc).__name__}")

        jobs = [gevent.spawn(one, n) for n in nodes]
        gevent.joinall(jobs)
        replies = [j.value for j in jobs]
        for reply in replies:
            if refresh and reply.status and reply.status < 300:
                self.refresh(reply.node)
        return replies

    @staticmethod
    def _with_stream_false(body: dict[str, Any]) -> bytes:
        return json.dumps({**body, "stream": False}).encode()

    def pull(self, body: dict[str, Any]) -> list[NodeReply]:
        """Pull onto every serving node (each node reports its outcome whole)."""
        return self.send_all("POST", "/api/pull", self._with_stream_false(body), self.serving())

    def create(self, body: dict[str, Any]) -> list[NodeReply]:
        source = body.get("from")
        nodes = self.having(source) if isinstance(source, str) and source else self.serving()
        return self.send_all("POST", "/api/create", self._with_stream_false(body), nodes)

    def delete(self, raw: bytes, model: str) -> Combined:
        replies = self.send_all("DELETE", "/api/delete", raw, self.having(model))
        if any(r.status == 200 for r in replies):
            return Combined(200, b"")
        return _json(404, {"error": f"model '{model}' not found"})

    def copy(self, raw: bytes, source: str) -> Combined:
        replies = self.send_all("POST", "/api/copy", raw, self.having(source))
        if any(r.status == 200 for r in replies):
            return Combined(200, b"")
        bad = [r for r in replies if r.status == 400]
        if bad:
            return _json(400, {"error": bad[0].message()})
        return _json(404, {"error": f'model "{source}" not found'})

    def blob_exists(self, digest: str) -> int:
        """200 only if every serving node has the blob, so the client uploads otherwise."""
        nodes = self.serving()
        replies = self.send_all("HEAD", f"/api/blobs/{digest}", None, nodes)
        if any(r.status == 400 for r in replies):
            return 400
        return 200 if nodes and all(r.status == 200 for r in replies) else 404

    def blob_upload(self, digest: str, data: bytes) -> Combined:
        replies = self.send_all("POST", f"/api/blobs/{digest}", data, self.serving())
        bad = [r for r in replies if r.status == 400]
        if bad:
            return _json(400, {"error": bad[0].message()})
        if not replies or any(r.status == 0 or r.status >= 500 for r in replies):
            failed = [r.message() for r in replies if r.status == 0 or r.status >= 500]
            return _json(502, {"error": "; ".join(failed) or "no node to upload to"})
        return Combined(201 if any(r.status == 201 for r in replies) else 200, b"")


def progress_outcome(replies: list[NodeReply]) -> tuple[bool, str]:
    """(all succeeded, error text naming the failing nodes) for pull/create."""
    if not replies:
        return False, "no node available"
    failed = [f"{r.node.id}: {r.message()}" for r in replies if r.status != 200]
    return not failed, "; ".join(failed)
