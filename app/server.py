"""The standalone appliance: config, pipeline, Flask app on gevent's WSGIServer, signals.

Client connections (``ClientHandler``): a socket timeout per phase, because waiting for the
next request on a kept-alive connection and waiting for a client to take a reply are different
things. Idle between requests: ``server.keepAliveTimeoutMs``, then the connection is closed.
During a request: ``server.writeTimeoutMs`` without progress on the socket ends the request,
which closes the node's stream and frees its slot (the WSGI iterable's close() does that), so
a client that stops reading cannot hold a GPU slot forever.

Graceful shutdown on SIGTERM (or SIGINT): stop accepting (under systemd the socket unit keeps
the listening socket, so new connections wait in its queue for the next process), close idle
kept-alive connections, answer what is already on a connection with ``Connection: close``, and
let requests and streams finish for up to ``server.drainSeconds``. A stream still running then
gets one error line in its own format before its connection closes, never a silent
truncation. Exit status 0 when nothing was cut, ``EXIT_STREAMS_CUT`` otherwise. SIGHUP
reloads the config.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import select
import signal
import socket
import time
from collections.abc import Callable
from typing import Any

import gevent
from gevent.event import Event
from gevent.pywsgi import WSGIHandler, WSGIServer

from app import logs, notify
from app.netutil import adopt_listener, linger_rst, listen_fds, make_listener, tune_accepted
from app.reload import ConfigWatcher, ReloadState
from app.web import create_app
from pipeline.config import Config, ServerConfig, load_config
from pipeline.factory import PipelineFactory
from pipeline.request import Ticket

log = logging.getLogger("ollama_lb.server")
access = logging.getLogger("ollama_lb.access")

CUT_REASON = "server shutting down: stream cut after the drain bound"
EXIT_STREAMS_CUT = 75  # EX_TEMPFAIL: stopped, but some requests were cut (retry them)
CUT_GRACE_S = 2.0  # after the drain bound: time for cut streams to send their error line
FRESH_S = 2.0  # a new connection gets this long to send its first request during a drain


class ClientHandler(WSGIHandler):
    """One client connection: per-phase timeouts, keep-alive that knows about draining."""

    server: ApplianceServer
    # ETIMEDOUT: TCP keepalive probes found the client gone; as quiet as a reset
    ignored_socket_errors = (*WSGIHandler.ignored_socket_errors, errno.ETIMEDOUT)
    idle = False  # waiting for a request line: safe to close at shutdown
    requests_read = 0  # requests read on this connection
    accepted_at = 0.0

    def handle(self) -> None:
        tune_accepted(self.socket)
        self.accepted_at = time.monotonic()
        self.greenlet = gevent.getcurrent()
        self.server.connections.add(self)
        try:
            super().handle()
        finally:
            self.server.connections.discard(self)

    def read_requestline(self) -> str:
        """Wait for the next request with the keep-alive timeout; closed when draining."""
        settings = self.server.settings()
        if self.server.draining and self.requests_read and not self.pending():
            return ""  # draining: a kept-alive connection with nothing sent is closed
        self.socket.settimeout(settings.keepAliveTimeoutMs / 1000.0)
        self.idle = True
        try:
            line = super().read_requestline()
        finally:
            self.idle = False
        self.socket.settimeout(settings.writeTimeoutMs / 1000.0)
        if line:
            self.requests_read += 1
        return line

    def pending(self) -> bool:
        """Bytes (or EOF) waiting to be read: the client may have sent its next request."""
        try:
            return bool(select.select([self.socket.fileno()], [], [], 0)[0])
        except (OSError, ValueError):
            return True

    def close_if_idle(self) -> None:
        """Close a kept-alive connection that is waiting and has nothing sent (shutdown)."""
        if self.idle and self.requests_read and not self.pending():
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)  # the waiting read sees EOF

    def get_environ(self) -> dict[str, Any]:
        """The client's socket goes into the environ, so a waiting view can watch it."""
        env = super().get_environ()
        env["ollama_lb.socket"] = self.socket
        return env

    def start_response(self, status: str, headers: list[tuple[str, str]],
                       exc_info: Any = None) -> Callable[[bytes], None]:
        if self.server.draining:  # the client's next request goes to the next process
            self.close_connection = True
            if not any(k.lower() == "connection" for k, _ in headers):
                headers = [*headers, ("Connection", "close")]
        return super().start_response(status, headers, exc_info)

    def _sendall(self, data: bytes) -> None:
        """Like pywsgi's, but the timeout bounds each wait for progress, not the whole write.

        A big reply to a slow but reading client is fine; a client that takes nothing for
        ``writeTimeoutMs`` raises TimeoutError here.
        """
        view = memoryview(data)
        try:
            while view:
                view = view[self.socket.send(view):]
        except OSError as ex:
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

    def handle_error(self, t: type[BaseException], v: BaseException, tb: Any) -> None:
        if not isinstance(v, TimeoutError):
            super().handle_error(t, v, tb)
            return
        self.close_connection = True
        with contextlib.suppress(OSError):
            linger_rst(self.socket)  # the client takes nothing: drop what is queued for it
        log.warning("client took nothing of the reply; request ended", extra={
            "event": "client_timeout", "client": self.client_address[0] if isinstance(
                self.client_address, tuple) else str(self.client_address),
            "path": self.path, "sent_bytes": self.response_length,
            "write_timeout_ms": self.server.settings().writeTimeoutMs})

    def log_request(self) -> None:
        pass  # pywsgi's own access log is replaced by the structured one


class ApplianceServer(WSGIServer):
    """pywsgi's server, knowing its connections so that a shutdown can drain them."""

    def __init__(self, listener: Any, application: Any,
                 settings: Callable[[], ServerConfig]) -> None:
        super().__init__(listener, application, handler_class=ClientHandler, log=None,
                         error_log=logging.getLogger("ollama_lb.wsgi"))
        self.settings = settings
        self.connections: set[ClientHandler] = set()
        self.draining = False

    def begin_drain(self) -> None:
        """Stop accepting; idle kept-alive connections close, busy ones after this reply."""
        self.draining = True
        self.close()
        for handler in list(self.connections):
            handler.close_connection = True
            handler.close_if_idle()

    def busy(self) -> int:
        """Connections in a request, or new ones whose first request may be on its way."""
        now = time.monotonic()
        return sum(1 for h in self.connections if not h.idle or (
            not h.requests_read and now - h.accepted_at < FRESH_S))

    def wait_quiet(self, deadline: float, in_flight: Callable[[], int]) -> None:
        while (in_flight() > 0 or self.busy()) and time.monotonic() < deadline:
            gevent.sleep(0.05)

    def kill_connections(self) -> None:
        gevent.killall([h.greenlet for h in list(self.connections)], timeout=1)


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
        host = self.host_override or config.server.host
        port = config.server.port if self.port_override is None else self.port_override
        listener, source = choose_listener(host, port, config.server.backlog)
        self.host, self.port = (host, listener.getsockname()[1]) if source == "bound" else (
            listener.getsockname()[:2])
        factory = self.factory
        self.server = ApplianceServer(listener, app, lambda: factory.config.server)
        self.server.start()
        if self.watch and self.config_path:
            self.watcher = ConfigWatcher(self.reload_state)
            self.watcher.start()
        if self.install_signals:
            self._install_signals()
        self._watchdog = notify.start_watchdog(self.unhealthy_reason)
        notify.send(f"READY=1\nSTATUS=serving on {self.host}:{self.port}")
        log.warning("ollama-lb listening", extra={
            "event": "started", "host": self.host, "port": self.port, "socket": source,
            "nodes": [n.id for n in self.factory.node_registry.all_nodes()],
            "strategy": config.strategy.type})
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
        return f"http://{host}:{self.port}"

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
        self.factory.stop()  # answers requests still queued for capacity
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
            "correlation_id": req.correlation_id, "client": req.client,
            "method": req.method, "path": req.path, "model": ticket.model_raw or None,
            "node": ticket.node_id, "status": ticket.status, "attempts": ticket.attempts,
            "queue_wait_ms": round(ticket.queue_wait * 1000, 2),
            "ttfb_ms": round((first - ticket.submitted_at) * 1000, 2) if first else None,
            "duration_ms": round((now - ticket.submitted_at) * 1000, 2),
            "stream": ticket.stream, "tokens": ticket.tokens,
            **({"body": req.body[:4096].decode(errors="replace")}
               if self.factory is not None and self.factory.config.logging.logBodies else {})})
