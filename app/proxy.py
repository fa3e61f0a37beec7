"""The Ollama surface: model-routed calls through the pipeline, pool-wide answers, and `/`.

A view reads the body (bounded), the request id and the forwarded headers into a plain
InferenceRequest, submits it without blocking, and relays what comes back: a complete reply
as is, or a stream line by line as it arrives. The stream's ``finally`` closes the upstream
response and frees the node slot, whether it ended, failed or the client went away.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, NamedTuple

from flask import Blueprint, Response, current_app, request

from app.bodypeek import BODY_KEY, FACTS_KEY
from app.clientwatch import watching
from app.errors import error_response, json_response, openai_error, plain
from app.meter import GRANT
from pipeline.endpoints import endpoint_for
from pipeline.errors import ErrorCode, PipelineError
from pipeline.factory import PipelineFactory
from pipeline.request import InferenceRequest, StreamHandle, Ticket, new_request_id
from pipeline.validation import OFF_HUB_BYTES, BadRequest, Facts, inspect_off_hub

bp = Blueprint("ollama", __name__)

MODEL_ROUTED = ("/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
                "/api/push", "/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                "/v1/inference", "/v1/responses", "/v1/messages")
#: client headers forwarded to the node, as (WSGI environ key, header name)
FORWARDED = (("HTTP_USER_AGENT", "User-Agent"), ("HTTP_ACCEPT", "Accept"),
             ("HTTP_AUTHORIZATION", "Authorization"))


def factory() -> PipelineFactory:
    return current_app.extensions["ollama_lb"]


def request_id(environ: dict[str, Any] | None = None) -> str:
    env = request.environ if environ is None else environ
    return env.get("HTTP_X_REQUEST_ID") or env.get("HTTP_X_CORRELATION_ID") or new_request_id()


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    """The body, bounded; the hot path reads the WSGI environ directly (one lookup each)
    rather than through Flask's request proxy. A body the gate already read (a key with a
    model allow-list) is taken as it left it, not read again from a copy."""
    if BODY_KEY in environ:
        body: bytes = environ[BODY_KEY]
        if len(body) <= limit:
            return body
    length = environ.get("CONTENT_LENGTH")
    if length and length.isdigit() and int(length) > limit:
        raise PipelineError(ErrorCode.PAYLOAD_TOO_LARGE,
                            f"request body too large: {length} bytes, the limit is {limit}")
    body = environ["wsgi.input"].read(limit + 1)
    if len(body) > limit:
        raise PipelineError(ErrorCode.PAYLOAD_TOO_LARGE,
                            f"request body too large: the limit is {limit} bytes")
    return body


class Reply(NamedTuple):
    """A proxied reply before any framework wraps it: what the fast lane writes as is, and
    what the Flask view turns into a ``Response``."""

    status: int
    headers: list[tuple[str, str]]  # Content-Type first
    body: Iterable[bytes]
    #: the pipeline's ticket: what the ledger read of the reply (its token counts)
    ticket: Ticket | None = None

    @property
    def content_type(self) -> str:
        return self.headers[0][1]

    def response(self) -> Response:
        return Response(self.body, status=self.status, headers=self.headers,
                        direct_passthrough=True)


def submit(env: dict[str, Any], f: PipelineFactory, path: str, body: bytes,
           method: str = "POST", model: str | None = None, facts: Facts | None = None
           ) -> Reply | Response:
    """Submit, wait, and hand back the reply (an error as a ``Response`` in the API's shape)."""
    rid = request_id(env)
    headers = tuple((name, env[key]) for key, name in FORWARDED if key in env)
    grant = env.get(GRANT)  # the gate's admission; its key is a name, None without keys
    req = InferenceRequest(path=path, body=body, method=method, model=model, headers=headers,
                           request_id=rid, client=env.get("REMOTE_ADDR") or "", facts=facts,
                           correlation_id=env.get("HTTP_X_CORRELATION_ID"),
                           key=grant.key if grant is not None else None)
    try:
        ticket = f.pipeline.submit(req)
        with watching(env.get("ollama_lb.socket"), ticket):
            result = ticket.result()
    except PipelineError as err:
        resp = error_response(err, path, rid)
        resp.headers["X-Request-ID"] = rid
        return resp
    if isinstance(result, StreamHandle):
        return Reply(result.status, [("Content-Type", result.content_type),
                                     ("X-Request-ID", rid)], StreamBody(result), ticket)
    return Reply(result.status, [("Content-Type", result.content_type),
                                 ("Content-Length", str(len(result.body))),
                                 ("X-Request-ID", rid)], [result.body], ticket)


def as_response(out: Reply | Response) -> Response:
    """What a Flask view returns: a Reply wrapped, a refusal or error as it is."""
    return out.response() if isinstance(out, Reply) else out


def _submit(path: str, body: bytes, method: str = "POST", model: str | None = None) -> Response:
    return as_response(submit(request.environ, factory(), path, body, method, model))


class StreamBody:
    """The WSGI iterable of a relayed stream: each upstream piece as it arrives.

    An object with ``close()`` rather than a generator: the server calls ``close()`` however
    the response ends, even when iteration never started (a generator's ``finally`` would not
    run then), and it closes the upstream stream and frees the node slot.
    """

    __slots__ = ("handle",)

    def __init__(self, handle: StreamHandle) -> None:
        self.handle = handle

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.handle.lines())

    def pump(self, offer: Callable[[bytes], bytes]) -> bytes | None:
        """Relay from the hub's loop until the iteration must go on (``StreamRelay.pump``)."""
        pump = self.handle.pump
        return pump(offer) if pump is not None else None

    def close(self) -> None:
        self.handle.close()


def model_routed() -> Response:
    return as_response(proxied(request.environ, factory()))


def proxied(env: dict[str, Any], f: PipelineFactory) -> Reply | Response:
    """A model-routed call, from the WSGI environ alone (the fast lane calls it too)."""
    path = env["PATH_INFO"]
    try:
        body = _read_body(env, f.config.server.maxBodyBytes)
        facts = env.get(FACTS_KEY) or (
            _large_body_facts(path, body) if len(body) >= OFF_HUB_BYTES else None)
    except PipelineError as err:
        return error_response(err, path)
    return submit(env, f, path, body, facts=facts)


def _large_body_facts(path: str, body: bytes) -> Facts | None:
    """A large body is parsed here, off the hub, so the ring's stages never stall on it."""
    ep = endpoint_for(path)
    if ep is None or len(body) < OFF_HUB_BYTES:
        return None
    try:
        return inspect_off_hub(ep, body)
    except BadRequest as exc:
        raise PipelineError(ErrorCode.INVALID_REQUEST, str(exc)) from None


for _path in MODEL_ROUTED:
    bp.add_url_rule(_path, endpoint=_path, view_func=model_routed, methods=["POST"])


@bp.get("/v1/models/<path:name>")
def openai_model(name: str) -> Response:
    if "/" in name:  # Ollama's route parameter cannot hold a slash
        return json_response(openai_error(404, f"model '{name}' not found"), 404)
    return _submit(f"/v1/models/{name}", b"", method="GET", model=name)


@bp.route("/", methods=["GET", "HEAD"])
def root() -> Response:
    return plain(200, "Ollama is running")


@bp.route("/api/version", methods=["GET", "HEAD"])
def version() -> Response:
    return json_response(factory().pool_lists.version())


@bp.route("/api/tags", methods=["GET", "HEAD"])
def tags() -> Response:
    return json_response(factory().pool_lists.tags())


@bp.get("/api/ps")
def ps() -> Response:
    return json_response(factory().pool_lists.ps())


@bp.get("/v1/models")
def openai_models() -> Response:
    return json_response(factory().pool_lists.openai_models())
