"""The placement plan: where each model of ``models:`` should be, and what it takes to get there.

A pure function of the config and what discovery last saw of each node (``/api/tags``,
``/api/ps``), recomputed on every reconciler pass, so that the plan always follows the pool:

- **targets**: ``nodes: [...]`` names them; ``replicas: N`` keeps the serving nodes that have
  the model (loaded copies first) and adds the nodes with the most free room (least bytes
  installed, then least loaded; VRAM first for a warm model), since nodes do not report their
  capacity; neither key means every node. A replica on a node that is down does not count: a
  model is kept on N nodes that can serve it.
- **pull** onto targets that lack it, **warm** (load, when ``warm: true``) on targets that have
  it unloaded, and only with ``prune: true`` **delete** copies outside the targets and models
  the config does not name. A node is acted on only when it serves and its lists are known;
  targets that are not are **waiting**.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from pipeline.config import ModelConfig
from pipeline.modelname import canonical, display
from pipeline.node import Node

#: the endpoints whose ``keep_alive`` Ollama honours (``/v1`` always uses the node's default)
KEEP_ALIVE_PATHS = frozenset(("/api/generate", "/api/chat", "/api/embed", "/api/embeddings"))


@dataclass(frozen=True)
class ModelPlan:
    name: str  # as configured
    model: str  # canonical
    want: str  # "every node", "2 replicas", "nodes gpu-a, gpu-b"
    targets: tuple[str, ...]  # node ids that should hold it
    installed: tuple[str, ...]  # serving nodes that have it
    loaded: tuple[str, ...]  # serving nodes that have it loaded
    pull: tuple[str, ...] = ()
    warm: tuple[str, ...] = ()
    delete: tuple[str, ...] = ()  # prune only
    waiting: tuple[str, ...] = ()  # targets that cannot be acted on now
    short: int = 0  # replicas wanted with no node to put them on

    @property
    def actions(self) -> bool:
        return bool(self.pull or self.warm or self.delete)

    @property
    def converged(self) -> bool:
        return not (self.actions or self.waiting or self.short)


@dataclass(frozen=True)
class Plan:
    models: tuple[ModelPlan, ...]
    prune: dict[str, tuple[str, ...]]  # node id -> models the config does not name (prune)
    unmanaged: dict[str, tuple[str, ...]]  # model (display) -> node ids, not named

    def get(self, model: str) -> ModelPlan | None:
        key = canonical(model)
        return next((p for p in self.models if p.model == key), None)


def serving(node: Node) -> bool:
    return node.enabled and not node.draining and node.admits()


def known(node: Node) -> bool:
    """Its installed list is from a discovery that worked (not a guess)."""
    return node.installed is not None and node.discovery_ok


def usable(node: Node) -> bool:
    return serving(node) and known(node)


def _bytes(entries: Iterable[dict[str, object]], key: str) -> int:
    total = 0
    for entry in entries:
        value = entry.get(key, entry.get("size"))
        total += value if isinstance(value, int) else 0
    return total


def room(node: Node, warm: bool) -> tuple[int, int, str]:
    """Sort key: the node with the most free room first (least disk, least VRAM used)."""
    disk, vram = _bytes(node.tags, "size"), _bytes(node.ps, "size_vram")
    return (vram, disk, node.id) if warm else (disk, vram, node.id)


def _choose(cfg: ModelConfig, model: str, nodes: list[Node]) -> tuple[list[str], str, int]:
    """(target node ids, what was asked, replicas that found no node)."""
    if cfg.nodes:
        return list(cfg.nodes), f"nodes {', '.join(cfg.nodes)}", 0
    if cfg.replicas is None:
        return [n.id for n in nodes if n.enabled and not n.draining], "every node", 0
    holders = sorted((n for n in nodes if usable(n) and model in (n.installed or ())),
                     key=lambda n: (model not in n.loaded, room(n, cfg.warm)))
    chosen = holders[:cfg.replicas]
    spare = sorted((n for n in nodes if usable(n) and n not in holders),
                   key=lambda n: room(n, cfg.warm))
    chosen += spare[:cfg.replicas - len(chosen)]
    want = f"{cfg.replicas} replica{'s' if cfg.replicas > 1 else ''}"
    return [n.id for n in chosen], want, cfg.replicas - len(chosen)


def plan_model(cfg: ModelConfig, nodes: list[Node], prune: bool) -> ModelPlan:
    model = canonical(cfg.name)
    by_id = {n.id: n for n in nodes}
    targets, want, short = _choose(cfg, model, nodes)
    has = [n.id for n in nodes if usable(n) and model in (n.installed or ())]
    loaded = [i for i in has if model in by_id[i].loaded]
    ready = [t for t in targets if t in by_id and usable(by_id[t])]
    return ModelPlan(
        name=cfg.name, model=model, want=want, targets=tuple(targets), installed=tuple(has),
        loaded=tuple(loaded),
        pull=tuple(t for t in ready if t not in has),
        warm=tuple(t for t in ready if t in has and t not in loaded) if cfg.warm else (),
        delete=tuple(i for i in has if i not in targets) if prune else (),
        waiting=tuple(t for t in targets if t not in ready), short=short)


def make_plan(models: tuple[ModelConfig, ...], nodes: list[Node], prune: bool) -> Plan:
    """The whole plan; with no model named nothing is planned (prune never empties a pool)."""
    if not models:
        return Plan((), {}, {})
    plans = tuple(plan_model(cfg, nodes, prune) for cfg in models)
    named = {p.model for p in plans}
    unmanaged: dict[str, list[str]] = {}
    for node in nodes:
        if known(node):
            for model in sorted((node.installed or set()) - named):
                unmanaged.setdefault(display(model), []).append(node.id)
    doomed: dict[str, tuple[str, ...]] = {}
    if prune:
        for node in nodes:
            extra = sorted(display(m) for m in (node.installed or set()) - named)
            if usable(node) and extra:
                doomed[node.id] = tuple(extra)
    return Plan(plans, doomed, {m: tuple(ids) for m, ids in unmanaged.items()})


def inject_keep_alive(body: bytes, value: str) -> bytes:
    """``body`` with ``"keep_alive": value`` first if it carries no ``keep_alive``; every other
    byte unchanged (bodies are forwarded as the client wrote them)."""
    if b'"keep_alive"' in body:
        try:
            data = json.loads(body)
        except ValueError:
            return body
        if not isinstance(data, dict) or "keep_alive" in data:
            return body
    start = body.find(b"{")
    if start < 0 or body[:start].strip():
        return body
    sep = b"" if body[start + 1:].lstrip().startswith(b"}") else b","
    return b"%s\"keep_alive\":%s%s%s" % (body[:start + 1], json.dumps(value).encode(), sep,
                                          body[start + 1:])
