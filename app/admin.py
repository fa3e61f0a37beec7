"""The admin API under /admin: nodes, strategy, reload, config, usage.

Protected by a bearer token (``admin.token`` or ``OLLAMA_LB_ADMIN_TOKEN``) or an API key with
the ``admin`` scope (``app/auth.py`` decides). With neither configured it answers loopback
clients only (never through an untrusted proxy) and tells others how to set one, so a config
that listens on 0.0.0.0 is still safe out of the box. Every change is logged with who and what.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import wraps
from typing import Any

from flask import Blueprint, Response, current_app, request

from app import auth
from app.errors import json_response
from pipeline.factory import PipelineFactory
from pipeline.operations import UnknownActionError, UnknownNodeError
from pipeline.strategy import StrategyFactory

bp = Blueprint("admin", __name__, url_prefix="/admin")
log = logging.getLogger("ollama_lb.admin")


def factory() -> PipelineFactory:
    return current_app.extensions["ollama_lb"]


def protected(view: Callable[..., Response]) -> Callable[..., Response]:
    """The gate gave its admin verdict before the view; asking again costs a dict lookup and
    keeps a view safe even if it were reached some other way."""

    @wraps(view)
    def guarded(*args: Any, **kwargs: Any) -> Response:
        sec = auth.security()
        refusal = auth.admin_verdict(sec, sec.refresh())
        if refusal is not None:
            return refusal
        return view(*args, **kwargs)

    return guarded


def _audit(action: str, **fields: Any) -> None:
    key = request.environ.get(auth.KEY)
    log.warning("admin change", extra={"event": "admin", "action": action,
                                       "client": request.remote_addr,
                                       "key": key.name if key is not None else None, **fields})


@bp.get("/nodes")
@protected
def nodes() -> Response:
    f = factory()
    return json_response({"nodes": [n.snapshot() for n in f.node_registry.all_nodes()],
                          "draining": [n.snapshot() for n in f.node_registry.removed_nodes()]})


@bp.post("/nodes/<node_id>/<action>")
@protected
def node_action(node_id: str, action: str) -> Response:
    """enable, disable or drain: ``PoolOperations`` steers the node and wakes waiters."""
    try:
        node = factory().operations.act(action, node_id)
    except UnknownNodeError as exc:
        return json_response({"error": str(exc)}, 404)
    except UnknownActionError as exc:
        return json_response({"error": str(exc)}, 400)
    _audit(f"node.{action}", node=node_id)
    return json_response(node.snapshot())


@bp.route("/strategy", methods=["GET", "POST"])
@protected
def strategy() -> Response:
    f = factory()
    if request.method == "POST":
        body = request.get_json(silent=True, force=True)
        name = body.get("strategy") if isinstance(body, dict) else None
        if name not in StrategyFactory.TYPES:
            return json_response({"error": f"unknown strategy {name!r}; valid: "
                                  f"{', '.join(StrategyFactory.names())}"}, 400)
        old = f.pipeline.strategy.name
        f.pipeline.set_strategy(name)
        _audit("strategy", old=old, new=name)
    return json_response({"strategy": f.pipeline.strategy.name,
                          "available": StrategyFactory.names()})


@bp.post("/reload")
@protected
def reload() -> Response:
    state = current_app.extensions.get("ollama_lb.reload")
    if state is None:
        return json_response({"error": "no config file to reload"}, 409)
    _audit("reload")
    result = state.reload("admin")
    return json_response(result, 200 if result["result"] == "applied" else 422)


@bp.get("/config")
@protected
def config() -> Response:
    f = factory()
    state = current_app.extensions.get("ollama_lb.reload")
    doc: dict[str, Any] = {"config": f.config.redacted()}
    if state is not None:
        doc.update(state.summary())
    return json_response(doc)


@bp.get("/usage")
@protected
def usage() -> Response:
    """Per key: requests, errors and tokens today (UTC) and in total, and requests in flight."""
    return json_response(auth.security().usage())
