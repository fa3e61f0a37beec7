"""Operator endpoints that bypass the ring: /health, /health/live, /health/ready, /metrics.

They read live state directly, so a saturated or wedged pipeline can still be seen. The
verdicts themselves are the core's (``pipeline.operations``); here they only become HTTP
answers: 200, or 503 when the verdict is DOWN.
"""

from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from app.errors import json_response, plain
from pipeline.factory import PipelineFactory
from pipeline.operations import DOWN

bp = Blueprint("ops", __name__)


def factory() -> PipelineFactory:
    return current_app.extensions["ollama_lb"]


def health_document(f: PipelineFactory) -> dict[str, Any]:
    """The pool's health (``PoolOperations.health``) with the last config reload added."""
    doc = f.operations.health()
    reload_state = current_app.extensions.get("ollama_lb.reload")
    if reload_state is not None:
        doc["config"] = reload_state.summary()
    return doc


def _answer(doc: dict[str, Any]) -> Response:
    return json_response(doc, 503 if doc["status"] == DOWN else 200)


@bp.get("/health")
def health() -> Response:
    return _answer(health_document(factory()))


@bp.get("/health/live")
def live() -> Response:
    """The process answers and every stage greenlet runs."""
    return _answer(factory().operations.live())


@bp.get("/health/ready")
def ready() -> Response:
    """At least one node can take a request and the pipeline is accepting."""
    return _answer(factory().operations.ready())


@bp.get("/metrics")
def metrics() -> Response:
    f = factory()
    if not f.config.metrics.enabled:
        return plain(404, "404 page not found")
    return Response(f.metrics_registry.scrape(),
                    content_type="text/plain; version=0.0.4; charset=utf-8")
