"""Model management through the appliance: pull, create, copy, delete, blobs (pool-wide).

The views are thin: what goes where is ``pipeline.fanout``'s, where a configured model is kept
is the reconciler's (``factory.placement``), and every request is in the pipeline's books
(``factory.management``: in flight for the drain, one access log line, counted per operation
and outcome). A pull or create answers once a node has started streaming (so that a refusal
every node agrees on, such as ``400 invalid model name``, is answered as Ollama answers it),
then relays the merged progress; ``stream: false`` gets the single final object. While the
view waits, and while it streams, the client's socket is watched: a client that goes away
cancels the work it started on every node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, current_app, request

from app.clientwatch import watching
from app.errors import error_response, json_response
from app.meter import GRANT
from pipeline.errors import PipelineError
from pipeline.factory import PipelineFactory
from pipeline.fanout import DIGEST, PIECE, Combined
from pipeline.management import ManagementCall
from pipeline.node import Node
from pipeline.progressrun import ProgressRun
from pipeline.request import new_request_id

bp = Blueprint("manage", __name__)
NDJSON = "application/x-ndjson"


class BlobTooLarge(Exception):
    """An upload (of unknown length) went past ``server.maxBlobBytes``."""


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


def _model_of(data: dict[str, Any]) -> str:
    value = data.get("model") or data.get("name") or ""
    return value if isinstance(value, str) else ""


def _begin(operation: str, model: str = "", stream: bool = False) -> ManagementCall:
    """Count the request in (raises SHUTTING_DOWN once the appliance stops)."""
    rid = (request.headers.get("X-Request-ID") or request.headers.get("X-Correlation-ID")
           or new_request_id())
    grant = request.environ.get(GRANT)  # the access line names the key that asked for it
    return factory().management.begin(
        operation, request.method, request.path, model, request_id=rid,
        client=request.remote_addr or "", correlation_id=request.headers.get("X-Correlation-ID"),
        stream=stream, key=grant.key if grant is not None else None)


def _answer(call: ManagementCall, resp: Response, outcome: str) -> Response:
    call.finish(outcome, resp.status_code)
    resp.headers["X-Request-ID"] = call.ticket.request.request_id
    return resp


def _combined(call: ManagementCall, c: Combined) -> Response:
    return _answer(call, Response(c.body, status=c.status, content_type=c.content_type),
                   c.outcome)


def _outcome(status: int) -> str:
    return "client_error" if 400 <= status < 500 else "failed"


# --- pull and create ---------------------------------------------------------------------------

def _progress(operation: str, data: dict[str, Any], nodes: list[Node]) -> Response:
    """Run a pull or create on ``nodes``: the merged stream, or the one final object."""
    stream = data.get("stream") is not False
    try:
        call = _begin(operation, _model_of(data), stream)
    except PipelineError as err:
        return error_response(err, request.path)
    call.targets([n.id for n in nodes])
    if not nodes:
        return _answer(call, json_response({"error": "no node available"}, 503), "failed")
    sock = request.environ.get("ollama_lb.socket")
    run = factory().fan_out.progress(request.path, data, nodes)
    try:
        with watching(sock, run):  # type: ignore[arg-type]  # abandon(), like a Ticket
            run.wait_started() if stream else run.join()
    except BaseException:
        run.close()
        call.finish("cancelled", "CANCELLED")
        raise
    if run.abandoned:  # the client went away while waiting
        run.close()
        return _answer(call, json_response({"error": "request canceled"}, 499), "cancelled")
    merge = run.merge
    if not merge.any_started:
        run.close()
        status, message = merge.refusal()
        return _answer(call, json_response({"error": message}, status), _outcome(status))
    if not stream:
        run.close()
        if merge.ok:
            return _answer(call, json_response({"status": "success"}), "success")
        partial = any(n.succeeded for n in merge.nodes.values())
        return _answer(call, json_response({"error": merge.failure()}, 500),
                       "partial" if partial else "failed")
    call.started()
    call.streaming(run)
    resp = Response(_relay(run, call, sock), content_type=NDJSON, direct_passthrough=True)
    resp.headers["X-Request-ID"] = call.ticket.request.request_id
    return resp


def _relay(run: ProgressRun, call: ManagementCall, sock: Any) -> Iterator[bytes]:
    """The merged lines as they come; however it ends, the nodes' requests end too."""
    complete = False
    try:
        with watching(sock, run):  # type: ignore[arg-type]
            yield from run.lines()
        complete = True
    finally:
        run.close()
        merge = run.merge
        if run.cut_reason is not None:
            call.finish("cut", "CUT")
        elif run.abandoned or not complete:
            call.finish("cancelled", "CANCELLED")
        elif merge.ok:
            call.finish("success", 200)
        else:
            partial = any(n.succeeded for n in merge.nodes.values())
            call.finish("partial" if partial else "failed", "STREAM_ERROR")


@bp.post("/api/pull")
def pull() -> Response:
    """Onto every serving node; a model named in ``models:`` onto its targets (and wherever
    it is already, to update it)."""
    _, data = _body()
    if isinstance(data, Response):
        return data
    model = _model_of(data)
    if not model:
        return json_response({"error": "invalid model name"}, 400)
    f = factory()
    nodes = f.placement.pull_targets(model)
    return _progress("pull", data, f.fan_out.serving() if nodes is None else nodes)


@bp.post("/api/create")
def create() -> Response:
    _, data = _body()
    if isinstance(data, Response):
        return data
    if not _model_of(data):
        return json_response({"error": "model is required"}, 400)
    return _progress("create", data, factory().fan_out.create_targets(data))


# --- copy and delete ---------------------------------------------------------------------------

def _on_holders(operation: str, model: str, run: Any) -> Response:
    try:
        call = _begin(operation, model)
    except PipelineError as err:
        return error_response(err, request.path)
    call.targets([n.id for n in factory().fan_out.having(model)])
    try:
        return _combined(call, run())
    finally:
        call.finish("cancelled", "CANCELLED")  # only if it did not finish (killed)


@bp.delete("/api/delete")
def delete() -> Response:
    raw, data = _body()
    if isinstance(data, Response):
        return data
    model = _model_of(data)
    if not model:
        return json_response({"error": "model is required"}, 400)
    fan_out = factory().fan_out
    return _on_holders("delete", model, lambda: fan_out.delete(raw, model))


@bp.post("/api/copy")
def copy() -> Response:
    raw, data = _body()
    if isinstance(data, Response):
        return data
    source = data.get("source")
    if not isinstance(source, str) or not source or not data.get("destination"):
        return json_response({"error": "invalid model name"}, 400)
    fan_out = factory().fan_out
    return _on_holders("copy", source, lambda: fan_out.copy(raw, source))


# --- blobs -------------------------------------------------------------------------------------

@bp.route("/api/blobs/<digest>", methods=["HEAD"])
def blob_head(digest: str) -> Response:
    if not DIGEST.fullmatch(digest):
        return Response(status=400)
    try:
        call = _begin("blob_check")
    except PipelineError as err:
        return error_response(err, request.path)
    status = factory().fan_out.blob_exists(digest)
    outcome = "success" if status == 200 else "client_error" if status < 500 else "failed"
    return _answer(call, Response(status=status), outcome)


def _pieces(limit: int) -> Iterator[bytes]:
    """The client's body as it arrives, in pieces; past ``limit`` bytes, BlobTooLarge."""
    stream, total = request.stream, 0
    while piece := stream.read(PIECE):
        total += len(piece)
        if total > limit:
            raise BlobTooLarge(f"blob too large: the limit is {limit} bytes "
                               "(server.maxBlobBytes)")
        yield piece


@bp.post("/api/blobs/<digest>")
def blob_post(digest: str) -> Response:
    """Streamed to every node that lacks the blob at once, never held whole."""
    if not DIGEST.fullmatch(digest):
        return json_response({"error": "invalid digest format"}, 400)
    limit = factory().config.server.maxBlobBytes
    length = request.content_length
    if length is not None and length > limit:
        return json_response({"error": f"blob too large: {length} bytes, the limit is {limit} "
                              "(server.maxBlobBytes)"}, 413)
    try:
        call = _begin("blob_upload")
    except PipelineError as err:
        return error_response(err, request.path)
    call.targets([n.id for n in factory().fan_out.serving()])
    try:
        return _combined(call, factory().fan_out.blob_upload(digest, _pieces(limit), length))
    except BlobTooLarge as exc:
        return _answer(call, json_response({"error": str(exc)}, 413), "client_error")
    except OSError as exc:  # the client went away (or stopped sending) mid-upload
        return _answer(call, json_response({"error": f"upload cut: {exc}"}, 400), "cancelled")
    finally:  # a body that stalls or ends early raises werkzeug's 408/400: counted out too
        call.finish("cancelled", "CANCELLED")  # only if not answered above
