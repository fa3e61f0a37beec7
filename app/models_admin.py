"""``GET /admin/models``: the placement of ``models:`` as the reconciler sees it.

Per configured model: what was asked (``want``), the target nodes, where it is installed and
loaded, the plan (what to pull, warm or delete; targets waiting for a node that is down),
what the reconciler is doing now (``pulling onto n1, n2 (42%)``) and its last error; then the
models present that the config does not name. Protected like the rest of ``/admin``.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app

from app.admin import protected
from app.errors import json_response
from pipeline.factory import PipelineFactory

bp = Blueprint("models_admin", __name__, url_prefix="/admin")


@bp.get("/models")
@protected
def models() -> Response:
    factory: PipelineFactory = current_app.extensions["ollama_lb"]
    return json_response(factory.placement.status())
