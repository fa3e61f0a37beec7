"""Operator endpoints that bypass the ring: /health, /health/live, /health/ready, /metrics.

They read live state directly, so a saturated or wedged pipeline can still be seen.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from app.errors import json_response, plain
from pipeline.factory import PipelineFactory
from pipeline.node import Health

bp = Blueprint("ops", __name__)


def factory() -> PipelineFactory:
    return current_app.extensions["ollama_lb"]


def overall(f: PipelineFactory) -> str:
    """UP: every enabled node serves; DEGRADED: some can; DOWN: none can, or a stage died."""
    p = f.pipeline
    if p.crashed or not p.running:
        return "DOWN"
    nodes = [n for n in f.node_registry.all_nodes() if n.enabled]
    serving = [n for n in nodes if n.admits()]
    if not serving:
        return "DOWN"
    if len(serving) < len(nodes) or any(n.health is not Health.UP for n in nodes):
        return "DEGRADED"
    return "UP"


def health_document(f: PipelineFactory) -> dict[str, Any]:
    status = overall(f)
    reload_state = current_app.extensions.get("ollama_lb.reload")
    doc: dict[str, Any] = {
        "status": status,
        "nodes": [n.snapshot() for n in f.node_registry.all_nodes()],
        "drainingNodes": [n.snapshot() for n in f.node_registry.removed_nodes()],
        "pipeline": f.pipeline.stats(),
    }
    if reload_state is not None:
        doc["config"] = reload_state.summary()
    return doc


@bp.get("/health")
def health() -> Response:
    doc = health_document(factory())
    return json_response(doc, 503 if doc["status"] == "DOWN" else 200)


@bp.get("/health/live")
def live() -> Response:
    """The process answers and every stage greenlet runs."""
    p = factory().pipeline
    ok = p.running and not p.crashed
    return json_response({"status": "UP" if ok else "DOWN", "crashed": p.crashed},
                         200 if ok else 503)


@bp.get("/health/ready")
def ready() -> Response:
    """At least one node can take a request and the pipeline is accepting."""
    f = factory()
    serving = [n.id for n in f.node_registry.all_nodes() if n.admits()]
    ok = f.pipeline.accepting and bool(serving)
    return json_response({"status": "UP" if ok else "DOWN", "servingNodes": serving},
                         200 if ok else 503)


@bp.get("/metrics")
def metrics() -> Response:
    f = factory()
    if not f.config.metrics.enabled:
        return plain(404, "404 page not found")
    return Response(f.metrics_registry.scrape(),
                    content_type="text/plain; version=0.0.4; charset=utf-8")
