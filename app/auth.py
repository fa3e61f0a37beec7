"""The gate: who may call what, checked before any view runs and before anything reaches a node.

Routes fall into classes: public (``GET|HEAD /``, ``/health*``), inference (everything of the
Ollama and OpenAI surface that is not management), manage (pull, push, create, copy, delete,
blobs), admin (``/admin/*``) and metrics. Classes come from the matched view, not from the path
text, so a spelling the router accepts (a trailing slash) cannot slip past; an unmatched path
counts as inference (with keys on, it needs a key before it even gets its 404).

With ``security.apiKeys``: a valid key (``Authorization: Bearer KEY``, or ``x-api-key`` as
Anthropic's clients send it) with the class's scope, and for a key with ``models`` a model on
its list, then the key's limits. The key is removed from the request once checked, so it is
never forwarded to a node. Without keys: inference is open; manage answers trusted loopback
clients only unless ``security.openManagement``; ``security.clientLimits`` apply per client
address. The admin API takes the admin token, an ``admin`` key, or (with neither configured)
a trusted loopback client.
"""

from __future__ import annotations

import hmac
import json
import logging
from typing import Any, NamedTuple

from flask import Flask, Request, Response, current_app, request

from app import denials
from app.bodypeek import models_named
from app.errors import json_response
from app.keys import ApiKey, bearer
from app.limits import Denied, limited
from app.meter import GRANT, Meter
from app.security import Security
from pipeline.config import Config
from pipeline.modelname import display

log = logging.getLogger("ollama_lb.auth")
PUBLIC, INFERENCE, MANAGE, ADMIN, METRICS = "public", "inference", "manage", "admin", "metrics"
KEY = "ollama_lb.key"  # the ApiKey the request was admitted with
ADMIN_OK = "ollama_lb.admin"  # the admin verdict was given (token, admin key or loopback)
PUBLIC_VIEWS = ("ops.health", "ops.live", "ops.ready")
LISTINGS = {"ollama.tags": "models", "ollama.ps": "models", "ollama.openai_models": "data"}
MANAGE_REFUSED = ("model management (pull, push, create, copy, delete, blobs) answers loopback "
                  "clients only while no API keys are configured; configure security.apiKeys "
                  "with a key that has the 'manage' scope (ollama-lb new-key NAME), or set "
                  "security.openManagement: true to open it to every client")
ADMIN_LOOPBACK = ("admin API answers only loopback clients while no token is set (and not "
                  "through a proxy unless server.trustedProxies lists it); set admin.token in "
                  "the config or OLLAMA_LB_ADMIN_TOKEN in the environment, or an API key with "
                  "the 'admin' scope")


def security() -> Security:
    return current_app.extensions["ollama_lb.security"]


def route_class(method: str, endpoint: str | None, path: str) -> str:
    """Which class a request belongs to, from the view it matched."""
    view = endpoint or ""
    if view.startswith("admin.") or path.startswith("/admin"):
        return ADMIN
    if view == "ops.metrics":
        return METRICS
    if view in PUBLIC_VIEWS or (view == "ollama.root" and method in ("GET", "HEAD")):
        return PUBLIC
    if view.startswith("manage.") or view == "ollama./api/push":
        return MANAGE
    return INFERENCE


def credential(environ: dict[str, Any]) -> str | None:
    """The presented key: a Bearer token, else ``x-api-key``; None if neither."""
    header = environ.get("HTTP_AUTHORIZATION")
    if header is not None:
        return bearer(header)
    return environ.get("HTTP_X_API_KEY") or None


def _denied(env: dict[str, Any], status: int, reason: str, key: str | None) -> None:
    log.info("request refused", extra={
        "event": "denied", "status": status, "reason": reason, "key": key,
        "client": env.get("REMOTE_ADDR"), "method": env.get("REQUEST_METHOD"),
        "path": env.get("PATH_INFO")})


def admin_verdict(sec: Security, cfg: Config, env: dict[str, Any] | None = None
                  ) -> Response | None:
    """None if the request may use the admin API (and /metrics when that needs admin)."""
    env = request.environ if env is None else env
    if env.get(ADMIN_OK):
        return None
    given, token = credential(env), cfg.admin_token()
    if token and given is not None and hmac.compare_digest(given.encode(), token.encode()):
        pass
    elif sec.keyring:
        key = sec.keyring.lookup(given) if given else None
        if key is None:
            _denied(env, 401, "unauthorized", None)
            return denials.unauthorized(env["PATH_INFO"])
        if "admin" not in key.scopes:
            sec.rejected(key.name, "scope")
            _denied(env, 403, "scope", key.name)
            return denials.forbidden(env["PATH_INFO"],
                                     f"forbidden: key '{key.name}' lacks the 'admin' scope")
        env[KEY] = key
    elif token:
        _denied(env, 401, "unauthorized", None)
        return json_response({"error": "admin API: missing or wrong bearer token"}, 401,
                             {"WWW-Authenticate": 'Bearer realm="ollama-lb admin"'})
    elif not sec.client(env).loopback:
        _denied(env, 403, "loopback", None)
        return json_response({"error": ADMIN_LOOPBACK}, 403)
    env[ADMIN_OK] = True
    return None


class Route(NamedTuple):
    """What the router matched: the view's endpoint name, its rule and its arguments."""

    endpoint: str | None
    rule: str | None
    view_args: dict[str, Any] | None

    @classmethod
    def of(cls, req: Request) -> Route:
        return cls(req.endpoint, req.url_rule.rule if req.url_rule is not None else None,
                   req.view_args)


def gate(env: dict[str, Any], route: Route, sec: Security) -> Response | None:
    """Before any view (Flask's ``before_request``, or the fast lane): None to go on, or the
    refusal."""
    cls = route_class(env["REQUEST_METHOD"], route.endpoint, env["PATH_INFO"])
    if cls == PUBLIC:
        return None
    cfg = sec.refresh()
    if sec.trust.networks:
        sec.client(env)  # behind a trusted proxy: REMOTE_ADDR is the forwarded client
    if cls == ADMIN or (cls == METRICS and sec.keyring and not cfg.metrics.public):
        return admin_verdict(sec, cfg, env)
    if cls == METRICS:
        return None
    if sec.keyring:
        return _with_key(env, route, sec, cfg, cls)
    return _without_keys(env, sec, cfg, cls)


def _with_key(env: dict[str, Any], route: Route, sec: Security, cfg: Config, cls: str
              ) -> Response | None:
    path = env["PATH_INFO"]
    # the key is taken out of the request: once checked (valid or not) it goes no further,
    # not to nodes, logs or any later code
    authorization = env.pop("HTTP_AUTHORIZATION", None)
    api_key = env.pop("HTTP_X_API_KEY", None)
    ring = sec.keyring
    key = ring.bearers.get(authorization) if authorization is not None else None
    if key is None:  # not a header seen before with a valid key
        key = ring.presented(authorization, api_key)
    if key is None:
        _denied(env, 401, "unauthorized", None)
        return denials.unauthorized(path)
    env[KEY] = key
    need = "manage" if cls == MANAGE else "inference"
    if need not in key.scopes:
        return _refuse(env, sec, key.name, "scope", f"forbidden: key '{key.name}' lacks the "
                       f"'{need}' scope")
    if key.patterns:
        names = models_named(route.endpoint or "", route.rule or path, route.view_args, env,
                             cfg.server.maxBodyBytes)
        for name in names:
            if not key.allows_model(name):
                return _refuse(env, sec, key.name, "model",
                               f"forbidden: key '{key.name}' may not use model '{name}'")
    try:
        env[GRANT] = sec.admit_key(key, cls == INFERENCE and env["REQUEST_METHOD"] == "POST")
    except Denied as exc:
        sec.rejected(key.name, exc.reason)
        _denied(env, 429, exc.reason, key.name)
        return denials.too_many(path, exc.message, exc.retry_after, exc.reason)
    return None


def _refuse(env: dict[str, Any], sec: Security, name: str, reason: str, message: str
            ) -> Response:
    sec.rejected(name, reason)
    _denied(env, 403, reason, name)
    return denials.forbidden(env["PATH_INFO"], message)


def _without_keys(env: dict[str, Any], sec: Security, cfg: Config, cls: str
                  ) -> Response | None:
    if cls == MANAGE and not cfg.security.openManagement and not sec.client(env).loopback:
        _denied(env, 403, "management", None)
        return denials.forbidden(env["PATH_INFO"], MANAGE_REFUSED)
    limits = cfg.security.clientLimits
    if not limited(limits):
        return None
    address = sec.client(env).address
    try:
        env[GRANT] = sec.admit_client(address, limits,
                                      cls == INFERENCE and env["REQUEST_METHOD"] == "POST")
    except Denied as exc:
        _denied(env, 429, exc.reason, None)
        return denials.too_many(env["PATH_INFO"], exc.message, exc.retry_after, exc.reason)
    return None


def filter_listing(resp: Response) -> Response:
    """Flask ``after_request``: a key with a model allow-list sees only its models listed."""
    key: ApiKey | None = request.environ.get(KEY)
    field = LISTINGS.get(request.endpoint or "")
    if key is None or not key.patterns or field is None or resp.status_code != 200:
        return resp
    try:
        doc = json.loads(resp.get_data())
        doc[field] = [m for m in doc[field]
                      if key.allows_model(display(m.get("model") or m.get("name")
                                                  or m.get("id") or ""))]
    except (ValueError, KeyError, TypeError, AttributeError):
        return resp
    resp.set_data(json.dumps(doc))
    return resp


def install(app: Flask, sec: Security) -> None:
    """The gate after CORS preflights (a browser's preflight carries no key), the listing
    filter, and the meter around the whole app."""
    app.extensions["ollama_lb.security"] = sec

    def before() -> Response | None:
        req = request._get_current_object()  # type: ignore[attr-defined]
        return gate(req.environ, Route.of(req), sec)

    app.before_request(before)
    app.after_request(filter_listing)
    app.wsgi_app = Meter(app.wsgi_app, sec.finish)  # type: ignore[method-assign]
