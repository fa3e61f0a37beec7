"""Model management through the appliance: pull, create, copy, delete, blobs (pool-wide)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import gevent
from flask import Blueprint, Response, current_app, request

from app.errors import json_response
from pipeline.factory import PipelineFactory
from pipeline.fanout import Combined, NodeReply, progress_outcome

bp = Blueprint("manage", __name__)
NDJSON = "application/x-ndjson"


def factory() -> PipelineFactory:
    return current_app.extensions["ollama_lb"]


def _body() -> tuple[bytes, dict[str, Any] | Response]:
    raw = request.get_data(cache=False)
    if not raw.strip():
        return raw, json_response({"error": "missing request body"}, 400)
    try:
        data = json.loads(raw)
    except ValueError:
        return raw, json_response({"error": "invalid character looking for beginning of "
                                   "value"}, 400)
    if not isinstance(data, dict):
        return raw, json_response({"error": "json: cannot unmarshal into Go value"}, 400)
    return raw, data


def _combined(c: Combined) -> Response:
    return Response(c.body, status=c.status, content_type=c.content_type)


def _model_of(data: dict[str, Any]) -> str:
    value = data.get("model") or data.get("name") or ""
    return value if isinstance(value, str) else ""


def _progress(data: dict[str, Any], first: str, run: Any) -> Response:
    """Run a pool-wide pull/create; stream progress unless stream is false."""
    if data.get("stream") is False:
        ok, error = progress_outcome(run())
        return json_response({"status": "success"} if ok else {"error": error},
                             200 if ok else 500)

    def lines() -> Iterator[bytes]:
        yield json.dumps({"status": first}).encode() + b"\n"
        job = gevent.spawn(run)
        try:
            replies: list[NodeReply] = job.get()
        finally:
            job.kill()
        ok, error = progress_outcome(replies)
        if ok:
            yield json.dumps({"status": "success"}).encode() + b"\n"
        else:
            yield json.dumps({"error": error}).encode() + b"\n"

    return Response(lines(), content_type=NDJSON, direct_passthrough=True)


def _pool_progress(operation: str, first: str, missing_model: str) -> Response:
    """pull/create: validate, then run on the pool (FanOut.pull or FanOut.create)."""
    _, data = _body()
    if isinstance(data, Response):
        return data
    if not _model_of(data):
        return json_response({"error": missing_model}, 400)
    run = getattr(factory().fan_out, operation)  # bound now: the stream outlives the request
    return _progress(data, first, lambda: run(data))


@bp.post("/api/pull")
def pull() -> Response:
    return _pool_progress("pull", "pulling manifest", "invalid model name")


@bp.post("/api/create")
def create() -> Response:
    return _pool_progress("create", "creating model", "model is required")


@bp.delete("/api/delete")
def delete() -> Response:
    raw, data = _body()
    if isinstance(data, Response):
        return data
    model = _model_of(data)
    if not model:
        return json_response({"error": "model is required"}, 400)
    return _combined(factory().fan_out.delete(raw, model))


@bp.post("/api/copy")
def copy() -> Response:
    raw, data = _body()
    if isinstance(data, Response):
        return data
    source = data.get("source")
    if not isinstance(source, str) or not source or not data.get("destination"):
        return json_response({"error": "invalid model name"}, 400)
    return _combined(factory().fan_out.copy(raw, source))


@bp.route("/api/blobs/<digest>", methods=["HEAD"])
def blob_head(digest: str) -> Response:
    return Response(status=factory().fan_out.blob_exists(digest))


@bp.post("/api/blobs/<digest>")
def blob_post(digest: str) -> Response:
    limit = factory().config.server.maxBodyBytes
    data = request.stream.read(limit + 1)
    if len(data) > limit:
        return json_response({"error": f"request body too large: the limit is {limit} bytes"},
                             413)
    return _combined(factory().fan_out.blob_upload(digest, data))
