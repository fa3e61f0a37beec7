"""The Flask application factory: blueprints, Gin-style 404/405, Ollama-shaped 500s."""

from __future__ import annotations

from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from app import admin, auth, cors, manage, models_admin, ops, proxy
from app.errors import http_error_response, unhandled_error_response
from app.fastlane import FastLane
from app.security import Security
from pipeline.factory import PipelineFactory


def create_app(factory: PipelineFactory, reload_state: Any = None) -> Flask:
    app = Flask("ollama_lb")
    app.extensions["ollama_lb"] = factory
    if reload_state is not None:
        app.extensions["ollama_lb.reload"] = reload_state
    app.url_map.strict_slashes = False
    for bp in (proxy.bp, manage.bp, ops.bp, admin.bp):
        app.register_blueprint(bp)
    app.register_blueprint(models_admin.bp)  # GET /admin/models: placement (reconciler)
    cors.install(app, lambda: app.extensions["ollama_lb"].config.server.allowedOrigins)
    sec = Security.of(factory)
    auth.install(app, sec)  # after CORS: a preflight carries no key
    # model-routed POSTs skip Flask's request cycle (and meter themselves)
    app.wsgi_app = FastLane(app.wsgi_app,  # type: ignore[method-assign]
                            lambda: app.extensions["ollama_lb"], sec)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        return http_error_response(exc, request.path)

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        return unhandled_error_response(exc, request.path)

    return app
