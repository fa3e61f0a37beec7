"""Answers the appliance composes from the whole pool: tags, ps, version, OpenAI model list.

Merging follows the API reference (§6.5): the union keyed by canonical model name, newest
``modified_at`` first for tags, latest ``expires_at`` first for ps, the lowest version among
reachable nodes. Unreachable nodes are skipped (and their last known lists used), so a dead node
shrinks the list instead of failing the call, as a single Ollama never answers 503 here.
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import gevent

from pipeline.health import model_key, take_ps, take_tags
from pipeline.modelname import canonical, namespace
from pipeline.node import Node
from pipeline.registry import NodeRegistry
from pipeline.upstream import UpstreamClient


class PoolView:
    def __init__(self, registry: NodeRegistry, upstream: UpstreamClient,
                 timeouts: tuple[float, float]) -> None:
        self.registry = registry
        self.upstream = upstream
        self.timeouts = timeouts  # (connect, read) seconds

    def _reachable(self) -> list[Node]:
        return [n for n in self.registry.all_nodes() if n.enabled and n.admits()]

    def _fetch(self, path: str) -> list[tuple[Node, Any]]:
        """GET ``path`` from every reachable node in parallel; failed nodes give None."""
        connect, read = self.timeouts

        def one(node: Node) -> Any:
            try:
                with gevent.Timeout(connect + read):
                    return self.upstream.get_json(node.url, path, connect, read)
            except (Exception, gevent.Timeout):
                return None

        nodes = self._reachable()
        jobs = [gevent.spawn(one, n) for n in nodes]
        gevent.joinall(jobs)
        return [(n, j.value) for n, j in zip(nodes, jobs, strict=True)]

    def tags(self) -> dict[str, Any]:
        merged: dict[str, dict[str, Any]] = {}
        for node, data in self._fetch("/api/tags"):
            if data is not None:
                take_tags(node, data)
            for entry in node.tags:
                key = model_key(entry)
                old = merged.get(key)
                if old is None or _time(entry.get("modified_at")) > _time(old.get("modified_at")):
                    merged[key] = entry
        models = sorted(merged.values(), key=lambda m: _time(m.get("modified_at")), reverse=True)
        return {"models": models}

    def ps(self) -> dict[str, Any]:
        merged: dict[str, dict[str, Any]] = {}
        for node, data in self._fetch("/api/ps"):
            if data is not None:
                take_ps(node, data)
            for entry in node.ps:
                key = model_key(entry)
                old = merged.get(key)
                if old is None or _time(entry.get("expires_at")) > _time(old.get("expires_at")):
                    merged[key] = dict(entry)
                    if old is not None and "context_length" in old:
                        merged[key]["context_length"] = max(
                            old.get("context_length") or 0, entry.get("context_length") or 0)
        models = sorted(merged.values(), key=lambda m: _time(m.get("expires_at")), reverse=True)
        return {"models": models}

    def version(self, fallback: str = "0.0.0") -> dict[str, str]:
        versions = []
        for node, data in self._fetch("/api/version"):
            if isinstance(data, dict) and data.get("version"):
                node.version = str(data["version"])
                versions.append(node.version)
        return {"version": min(versions, key=_version_key) if versions else fallback}

    def openai_models(self) -> dict[str, Any]:
        return {"object": "list", "data": [_openai_model(m.get("model") or m.get("name"),
                                                         m.get("modified_at"))
                                           for m in self.tags()["models"]]}

    def openai_model(self, name: str) -> dict[str, Any] | None:
        """One model in OpenAI shape, echoing the requested id; None if no node has it."""
        key = canonical(name)
        for entry in self.tags()["models"]:
            if model_key(entry) == key:
                return _openai_model(name, entry.get("modified_at"))
        return None


def _openai_model(name: str, modified_at: Any) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": int(_time(modified_at)) or int(time.time()),
            "owned_by": namespace(name)}


def _time(value: Any) -> float:
    """Seconds since the epoch from an RFC 3339 time with up to nanosecond precision."""
    if not isinstance(value, str) or not value:
        return 0.0
    text = value.replace("Z", "+00:00")
    if "." in text:  # Python parses at most 6 fraction digits
        head, rest = text.split(".", 1)
        digits = len(rest) - len(rest.lstrip("0123456789"))
        text = f"{head}.{rest[:min(digits, 6)]}{rest[digits:]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return 0.0


def _version_key(v: str) -> tuple[int, ...]:
    parts = []
    for piece in v.split("-")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)
