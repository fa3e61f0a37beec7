"""The standalone appliance: config, pipeline, Flask app on gevent's WSGIServer, signals.

Client connections (timeouts, bounded intake, the per-client cap, TLS) are
``app.transport``'s.

Graceful shutdown on SIGTERM (or SIGINT): stop accepting (under systemd the socket unit keeps
the listening socket, so new connections wait in its queue for the next process), close idle
kept-alive connections (after a quarter of a second's grace for one that just had a reply:
its next request may already be on its way), answer what is already on a connection with
``Connection: close``, and let requests and streams finish for up to ``server.drainSeconds``.
From the SIGTERM on, ``/health/ready`` answers 503 (``operations.draining``), so a balancer
probing a connection that is still open moves traffic away. A stream still running then gets
one error line in its own format before its connection closes, never a silent
truncation. Exit status 0 when nothing was cut, ``EXIT_STREAMS_CUT`` otherwise. SIGHUP
reloads the config.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any

import gevent
from gevent.event import Event

from app import logs, notify
from app.netutil import adopt_listener, listen_fds, make_listener
from app.reload import ConfigWatcher, ReloadState
from app.security import Security, exposure
from app.tls import TlsTerminator
from app.transport import ApplianceServer, ClientHandler
from app.web import create_app
from pipeline.config import Config, load_config
from pipeline.factory import PipelineFactory
from pipeline.request import Ticket

log = logging.getLogger("ollama_lb.server")
WORKER_SLOT = "OLLAMA_LB_WORKER"  # set by app/master.py for each worker: its slot, from 0
access = logging.getLogger("ollama_lb.access")

CUT_REASON = "server shutting down: stream cut after the drain bound"
EXIT_STREAMS_CUT = 75  # EX_TEMPFAIL: stopped, but some requests were cut (retry them)
CUT_GRACE_S = 2.0  # after the drain bound: time for cut streams to send their error line
__all__ = ["CUT_REASON", "EXIT_STREAMS_CUT", "ApplianceServer", "ClientHandler",
           "OllamaLoadBalancerApplication"]


def choose_listener(host: str, port: int, backlog: int) -> tuple[Any, str]:
    """The socket systemd passed (LISTEN_FDS, fd 3), else one bound here; and which it was."""
    fds = listen_fds()
    if not fds:
        return make_listener(host, port, backlog), "bound"
    if len(fds) > 1:
        log.warning("systemd passed more than one socket; serving the first",
                    extra={"event": "listen_fds", "fds": fds})
    sock = adopt_listener(fds[0])
    bound_host, bound_port = sock.getsockname()[:2]
    if port and (bound_port != port or host not in (bound_host, "0.0.0.0", "::", "")):
        log.warning("the systemd socket does not listen where the config says; the socket "
                    "wins (deploy/install.sh rewrites the socket unit from the config)",
                    extra={"event": "listen_mismatch", "socket": f"{bound_host}:{bound_port}",
                           "config": f"{host}:{port}"})
    return sock, "systemd"


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
        self.server: ApplianceServer | None = None
        self.watcher: ConfigWatcher | None = None
        self.reload_state: ReloadState | None = None
        self.port: int | None = None
        self.host: str = "0.0.0.0"
        self.exit_status = 0  # what the process exits with: EXIT_STREAMS_CUT if any were cut
        self._stopped = Event()
        self._stopping = False
        self._watchdog: gevent.Greenlet | None = None
        self.tls: TlsTerminator | None = None

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> OllamaLoadBalancerApplication:
        config = self._config or load_config(self.config_path)  # type: ignore[arg-type]
        logs.configure(config.logging.level)
        tls = TlsTerminator(lambda: (self.factory.config if self.factory else config).server.tls
                            ) if config.server.tls.certFile else None  # bad files: ConfigError
        self.factory = PipelineFactory(config).start(health_checks=self.health_checks)
        if os.environ.get(WORKER_SLOT, "0") != "0":  # one worker places models for the pool
            self.factory.placement.active = False
        self.factory.pipeline.finish_hooks.append(self._access_log)
        self.reload_state = ReloadState(self.config_path, self.factory)
        self.reload_state.notify = notify.send
        self.reload_state.hooks.append(lambda c: logs.configure(c.logging.level))
        self.reload_state.hooks.append(self._tls_mode_kept)
        app = create_app(self.factory, self.reload_state)
        host = self.host_override or config.server.host
        port = config.server.port if self.port_override is None else self.port_override
        listener, source = choose_listener(host, port, config.server.backlog)
        self.host, self.port = (host, listener.getsockname()[1]) if source == "bound" else (
            listener.getsockname()[:2])
        # what is open beyond loopback, judged where the socket listens: --host and a systemd
        # socket override server.host, and the bound address is the one clients can reach
        exposure(config, listener.getsockname()[0])
        factory = self.factory
        self.tls = tls.start() if tls is not None else None
        self.server = ApplianceServer(listener, app, lambda: factory.config.server, self.tls)
        self.server.start()
        if self.watch and self.config_path:
            self.watcher = ConfigWatcher(self.reload_state)
            self.watcher.start()
        if self.install_signals:
            self._install_signals()
        self._watchdog = notify.start_watchdog(self.unhealthy_reason)
        log.warning("ollama-lb listening", extra={
            "event": "started", "host": self.host, "port": self.port, "socket": source,
            "tls": self.tls is not None, "mutual_tls": bool(config.server.tls.clientCaFile),
            "nodes": [n.id for n in self.factory.node_registry.all_nodes()],
            "strategy": config.strategy.type})
        notify.send(f"READY=1\nSTATUS=serving on {self.host}:{self.port}")
        return self

    def unhealthy_reason(self) -> str | None:
        """Why systemd's watchdog must not be fed now; None while no stage crashed and every
        stage greenlet runs (what /health/live reports too)."""
        p = self.factory.pipeline if self.factory is not None else None
        if p is None or not p.running:
            return "pipeline not running"
        if p.crashed is not None:
            return p.crashed
        dead = [s.name for s in p.stages if s.greenlet is None or s.greenlet.dead]
        return f"stage greenlets not running: {', '.join(dead)}" if dead else None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        host = f"[{host}]" if ":" in host and host != "::" else (
            "[::1]" if host == "::" else host)
        return f"{'https' if self.tls else 'http'}://{host}:{self.port}"

    def _tls_mode_kept(self, config: Config) -> None:
        """Paths and files reload; switching between HTTP and HTTPS takes a restart."""
        if bool(config.server.tls.certFile) != (self.tls is not None):
            log.warning("server.tls: switching between HTTP and HTTPS takes a restart; the "
                        "port keeps speaking " + ("HTTPS" if self.tls else "plain HTTP"),
                        extra={"event": "config_reload", "restart_required": ["server.tls"]})

    def _install_signals(self) -> None:
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.shutdown))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self.shutdown))
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self._sighup))

    def _sighup(self) -> None:
        if self.reload_state is not None:
            self.reload_state.reload("SIGHUP")

    def shutdown(self, drain_s: float | None = None) -> None:
        """Stop accepting, drain requests and streams, cut what outlives the bound, stop."""
        if self._stopping:
            self._stopped.wait()
            return
        self._stopping = True
        assert self.factory is not None and self.server is not None
        p = self.factory.pipeline
        drain = self.factory.config.server.drainSeconds if drain_s is None else drain_s
        notify.send(f"STOPPING=1\nSTATUS=draining {p.in_flight} requests for up to {drain:g} s")
        log.warning("shutting down", extra={"event": "stopping", "drain_s": drain,
                                            "in_flight": p.in_flight})
        left, cut = p.in_flight, 0  # what is reported if the drain itself fails
        try:
            left, cut = self._drain(drain)
        finally:
            try:
                self._stop_everything()
            finally:
                self.exit_status = EXIT_STREAMS_CUT if left else 0
                log.warning("stopped", extra={"event": "stopped", "cut_requests": left,
                                              "cut_streams": cut,
                                              "exit_status": self.exit_status})
                self._stopped.set()

    def _drain(self, drain: float) -> tuple[int, int]:
        """Drain up to ``drain`` s; then cut the streams left. (requests left, streams cut)"""
        assert self.factory is not None and self.server is not None
        p, server = self.factory.pipeline, self.server
        self.factory.operations.draining = True  # /health/ready: 503 from now on
        server.begin_drain()
        server.wait_quiet(time.monotonic() + drain, lambda: p.in_flight)
        left, cut = p.in_flight, 0
        if left:
            try:
                cut = p.cut_streams(CUT_REASON)
            except Exception:  # still stop: the connections are closed below regardless
                log.exception("cutting the streams failed", extra={"event": "cut_failed"})
            server.wait_quiet(time.monotonic() + CUT_GRACE_S, lambda: p.in_flight)
        return left, cut

    def _stop_everything(self) -> None:
        assert self.factory is not None and self.server is not None
        if self.watcher is not None:
            self.watcher.stop()
        if self._watchdog is not None:
            self._watchdog.kill()
        if self.tls is not None:
            self.tls.stop()
        self.factory.stop()  # answers requests still queued for capacity
        Security.close_for(self.factory)  # usage written behind is flushed, not lost
        self.server.wait_quiet(time.monotonic() + CUT_GRACE_S, lambda: 0)
        self.server.kill_connections()

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
            "correlation_id": req.correlation_id, "client": req.client, "key": req.key,
            "method": req.method, "path": req.path, "model": ticket.model_raw or None,
            "node": ticket.node_id, "status": ticket.status, "attempts": ticket.attempts,
            "queue_wait_ms": round(ticket.queue_wait * 1000, 2),
            "ttfb_ms": round((first - ticket.submitted_at) * 1000, 2) if first else None,
            "duration_ms": round((now - ticket.submitted_at) * 1000, 2),
            "stream": ticket.stream, "tokens": ticket.tokens,
            **({"body": req.body[:4096].decode(errors="replace")}
               if self.factory is not None and self.factory.config.logging.logBodies else {})})
