"""Answers the appliance composes from the whole pool: tags, ps, version, OpenAI model list.

Merging: the union keyed by canonical model name, newest
``modified_at`` first for tags, latest ``expires_at`` first for ps, the lowest version among
reachable nodes. Answers come from the discovery state (each node's last known lists), never
from a call made while the client waits: clients such as Open WebUI poll these routes, and one
frozen node must not make every poll wait for its timeout. A node whose lists are older than
``max_age`` gets a background refresh (at most one in flight per node).
"""

from __future__ import annotations

import time
from datetime import datetime
from typing import Any

import gevent

from pipeline.health import HealthChecker, model_key
from pipeline.modelname import canonical, namespace
from pipeline.node import Node
from pipeline.registry import NodeRegistry


class PoolLists:
    """The pool's merged model lists and version, read from what discovery last saw."""

    def __init__(self, registry: NodeRegistry, checker: HealthChecker,
                 max_age_s: float = 1.0, wait_s: float = 0.5) -> None:
        self.registry = registry
        self.checker = checker
        self.max_age_s = max_age_s  # lists older than this are refreshed
        self.wait_s = wait_s  # longest wait for refreshes of nodes that answer

    def _reachable(self) -> list[Node]:
        """Nodes taking requests, their lists refreshed where old.

        A refresh this call starts for a node whose last refresh succeeded is waited for, up
        to ``wait_s`` (a healthy node answers in milliseconds, so lists are fresh right after
        a request loaded a model); a node whose last refresh failed, or whose refresh is
        already under way, is answered from its last known lists at once.
        """
        nodes = [n for n in self.registry.all_nodes() if n.enabled and n.admits()]
        now = time.monotonic()
        fresh = []
        for node in nodes:
            if not node.discovery or (node.models_at is not None
                                      and now - node.models_at < self.max_age_s):
                continue
            waited_for = node.discovery_ok and not self.checker.refreshing(node)
            job = self.checker.refresh(node)
            if waited_for:
                fresh.append(job)
        if fresh:
            gevent.joinall(fresh, timeout=self.wait_s)
        return nodes

    def tags(self) -> dict[str, Any]:
        merged: dict[str, dict[str, Any]] = {}
        for node in self._reachable():
            for entry in node.tags:
                key = model_key(entry)
                old = merged.get(key)
                if old is None or _time(entry.get("modified_at")) > _time(old.get("modified_at")):
                    merged[key] = entry
        models = sorted(merged.values(), key=lambda m: _time(m.get("modified_at")), reverse=True)
        return {"models": models}

    def ps(self) -> dict[str, Any]:
        merged: dict[str, dict[str, Any]] = {}
        for node in self._reachable():
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
        versions = [n.version for n in self._reachable() if n.version]
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
