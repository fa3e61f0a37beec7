"""The standalone appliance: config, pipeline, Flask app on gevent's WSGIServer, signals.

Graceful shutdown: on SIGTERM (or SIGINT) stop accepting, stop taking new requests, let the
requests and streams in flight finish for up to ``server.drainSeconds``, then stop. SIGHUP
reloads the config. The process exits 0 after a clean drain.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

from app import logs, notify
from app.netutil import make_listener
from app.reload import ConfigWatcher, ReloadState
from app.web import create_app
from pipeline.config import Config, load_config
from pipeline.factory import PipelineFactory
from pipeline.request import Ticket

log = logging.getLogger("ollama_lb.server")
access = logging.getLogger("ollama_lb.access")


class _QuietHandler(WSGIHandler):
    """pywsgi's own access log is replaced by the structured one."""

    def get_environ(self) -> dict[str, Any]:
        """The client's socket goes into the environ, so a waiting view can watch it."""
        env = super().get_environ()
        env["ollama_lb.socket"] = self.socket
        return env

    def log_request(self) -> None:
        pass


class OllamaLoadBalancerApplication:
    """Run the appliance: ``start()``, then ``await_shutdown()``; or use ``with``."""

    def __init__(self, config: str | os.PathLike[str] | Config, *, host: str | None = None,
                 port: int | None = None, watch: bool = True, health_checks: bool = True,
                 install_signals: bool = False) -> None:
        self.config_path = None if isinstance(config, Config) else os.fspath(config)
        self._config = config if isinstance(config, Config) else None
        self.host_override, self.port_override = host, port
        self.watch = watch
        self.health_checks = health_checks
        self.install_signals = install_signals
        self.factory: PipelineFactory | None = None
        self.server: WSGIServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.reload_state: ReloadState | None = None
        self.port: int | None = None
        self.host: str = "0.0.0.0"
        self._stopped = Event()
        self._stopping = False
        self._watchdog: gevent.Greenlet | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> OllamaLoadBalancerApplication:
        config = self._config or load_config(self.config_path)  # type: ignore[arg-type]
        logs.configure(config.logging.level)
        self.factory = PipelineFactory(config).start(health_checks=self.health_checks)
        self.factory.pipeline.finish_hooks.append(self._access_log)
        self.reload_state = ReloadState(self.config_path, self.factory)
        self.reload_state.notify = notify.send
        self.reload_state.hooks.append(lambda c: logs.configure(c.logging.level))
        app = create_app(self.factory, self.reload_state)
        self.host = self.host_override or config.server.host
        port = config.server.port if self.port_override is None else self.port_override
        listener = make_listener(self.host, port, config.server.backlog)
        self.port = listener.getsockname()[1]
        self.server = WSGIServer(listener, app, handler_class=_QuietHandler, log=None,
                                 error_log=logging.getLogger("ollama_lb.wsgi"))
        self.server.start()
        if self.watch and self.config_path:
            self.watcher = ConfigWatcher(self.reload_state)
            self.watcher.start()
        if self.install_signals:
            self._install_signals()
        self._watchdog = notify.start_watchdog()
        notify.send("READY=1")
        log.warning("ollama-lb listening", extra={
            "event": "started", "host": self.host, "port": self.port,
            "nodes": [n.id for n in self.factory.node_registry.all_nodes()],
            "strategy": config.strategy.type})
        return self

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host and host != "::" else (
            "[::1]" if host == "::" else host)
        return f"http://{host}:{self.port}"

    def _install_signals(self) -> None:
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.shutdown))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self.shutdown))
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self._sighup))

    def _sighup(self) -> None:
        if self.reload_state is not None:
            self.reload_state.reload("SIGHUP")

    def shutdown(self, drain_s: float | None = None) -> None:
        """Stop accepting, drain in-flight requests and streams, then stop everything."""
        if self._stopping:
            self._stopped.wait()
            return
        self._stopping = True
        notify.send("STOPPING=1")
        assert self.factory is not None and self.server is not None
        drain = self.factory.config.server.drainSeconds if drain_s is None else drain_s
        log.warning("shutting down", extra={"event": "stopping", "drain_s": drain,
                                            "in_flight": self.factory.pipeline.in_flight})
        self.server.close()  # no new connections
        self.factory.pipeline.stop_accepting()  # new requests on open connections get 503
        deadline = time.monotonic() + drain
        while self.factory.pipeline.in_flight > 0 and time.monotonic() < deadline:
            gevent.sleep(0.05)
        left = self.factory.pipeline.in_flight
        self.server.stop(timeout=1)  # idle keep-alive connections
        if self.watcher is not None:
            self.watcher.stop()
        if self._watchdog is not None:
            self._watchdog.kill()
        self.factory.stop()
        log.warning("stopped", extra={"event": "stopped", "cut_requests": left})
        self._stopped.set()

    def await_shutdown(self, timeout: float | None = None) -> bool:
        return self._stopped.wait(timeout)

    def __enter__(self) -> OllamaLoadBalancerApplication:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.shutdown(drain_s=0 if exc[0] else None)

    # --- access log ---------------------------------------------------------------------------

    def _access_log(self, ticket: Ticket) -> None:
        if not access.isEnabledFor(logging.INFO):
            return
        req = ticket.request
        now = time.monotonic()
        first = ticket.first_byte_at
        access.info("request", extra={
            "event": "request", "request_id": req.request_id,
            "correlation_id": req.correlation_id, "client": req.client,
            "method": req.method, "path": req.path, "model": ticket.model_raw or None,
            "node": ticket.node_id, "status": ticket.status, "attempts": ticket.attempts,
            "queue_wait_ms": round(ticket.queue_wait * 1000, 2),
            "ttfb_ms": round((first - ticket.submitted_at) * 1000, 2) if first else None,
            "duration_ms": round((now - ticket.submitted_at) * 1000, 2),
            "stream": ticket.stream, "tokens": ticket.tokens,
            **({"body": req.body[:4096].decode(errors="replace")}
               if self.factory is not None and self.factory.config.logging.logBodies else {})})
