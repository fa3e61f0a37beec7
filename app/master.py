"""Pre-fork master for ``server.workers: N``: N worker processes serve one listening socket.

One appliance process uses one core. The master binds the socket (or takes systemd's over,
exactly as the single process does: ``app.server.choose_listener``), then forks and execs N
workers. Each worker is the unchanged single-process appliance, ``python -m app serve
CONFIG``: the socket arrives as fd 3 with ``LISTEN_FDS=1``/``LISTEN_PID``, the way systemd
hands it over, so the worker's own takeover, drain and exit status are the ones tested for a
single process. A fresh interpreter per worker (fork, then exec) shares nothing with the
master: no hub, no Redis connection, no lock taken at fork time.

Workers report to the master as they would to systemd: their ``NOTIFY_SOCKET`` is a datagram
socket of the master's, and ``SO_PASSCRED`` tells the master which worker sent a line (the
kernel vouches for the pid). The master sends READY=1 once every worker is ready, feeds the
watchdog only while every worker is alive, ready and pinging, and kills a worker whose pings
stopped (what systemd would do to a single process); a worker that exits is started again
after a backoff. SIGHUP goes to every worker (RELOADING=1, then READY=1 once all reloaded);
SIGTERM drains every worker and the master exits 0, or 75 if any worker cut requests.

Node caps: every worker is an appliance instance, so without shared state each would allow
each node its whole ``maxConcurrentRequests``: N workers, N times the cap, the failure the
issue is about. More than one worker without ``sharedState.redisUrl`` is refused at start.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import secrets
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event
from gevent import monkey
from gevent import socket as gsocket

from app import logs, notify
from pipeline.config import Config, ConfigError, load_config

log = logging.getLogger("ollama_lb.master")
WORKER_ENV = "OLLAMA_LB_WORKER"  # set for a worker: serve as one process, log its pid
DEFAULT_WATCHDOG_USEC = 10_000_000  # a worker's pings, when systemd asked the master for none
BACKOFF_S = (0.1, 10.0)  # first restart delay, doubling up to this after quick crashes
STABLE_S = 10.0  # a worker that lived this long resets the backoff
RELOAD_WAIT_S = 30.0
EXIT_CUT = 75  # app.server.EXIT_STREAMS_CUT (not imported: the master needs no Flask)
_UCRED = struct.Struct("3i")
_PR_SET_PDEATHSIG = 1


def refusal(config: Config) -> str | None:
    """Why this many workers cannot run with this config, or None."""
    n = config.server.workers
    if n > 1 and not config.sharedState.redisUrl:
        return (f"server.workers: {n} workers need sharedState.redisUrl: without it every "
                f"worker would allow each node its whole maxConcurrentRequests ({n}x the cap). "
                "Set sharedState.redisUrl (deploy/install.sh --workers N starts a local "
                "redis-server on a Unix socket) or server.workers: 1")
    return None


def maybe_run_master(path: str, host: str | None, port: int | None, watch: bool) -> int | None:
    """The exit status of a master run, or None: serve as one process, as before.

    None for a worker, for ``workers: 1``, and for a config that does not load (the single
    process path reports its problems exactly as it always has).
    """
    if os.environ.get(WORKER_ENV):
        _tag_log_records(os.getpid())
        return None
    try:
        config = load_config(path)
    except ConfigError:
        return None
    if config.server.workers <= 1:
        return None
    problem = refusal(config)
    if problem is not None:
        print(f"{path}: invalid config, not starting\n  {problem}", file=sys.stderr)
        return 2
    return Master(path, config, host, port, watch).run()


def _tag_log_records(pid: int) -> None:
    """Every log line of a worker carries ``"worker": <pid>``: N processes share one journal."""
    make = logging.getLogRecordFactory()

    def tagged(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        record.worker = pid
        return record

    logging.setLogRecordFactory(tagged)


@dataclass
class Worker:
    """One worker slot: the process in it now, and what it last told the master."""

    slot: int
    pid: int = 0
    started_at: float = 0.0
    ready: bool = False
    last_ping: float = 0.0
    ready_at: float = 0.0  # the last READY=1 (a reload ends with one)
    crashes: int = 0  # quick exits in a row: the backoff
    restart_at: float = 0.0
    status: list[str] = field(default_factory=list)


class Master:
    """Owns the socket and the workers; ``run()`` returns the exit status."""

    def __init__(self, path: str, config: Config, host: str | None, port: int | None,
                 watch: bool) -> None:
        self.path, self.config = path, config
        self.host, self.port, self.watch = host, port, watch
        self.workers = [Worker(k) for k in range(config.server.workers)]
        self.stopping = False
        self.announced = False  # READY=1 sent to systemd
        self.statuses: list[int] = []  # exit statuses of workers stopped by SIGTERM
        self.wd_usec = self._worker_watchdog_usec()
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.listener: Any = None
        self.inbox: Any = None
        self.inbox_addr = f"@ollama-lb-master-{os.getpid()}-{secrets.token_hex(4)}"

    # --- lifecycle ----------------------------------------------------------------------------

    def run(self) -> int:
        from app.server import choose_listener  # the single process's takeover, reused

        logs.configure(self.config.logging.level)
        s = self.config.server
        self.listener, source = choose_listener(self.host or s.host,
                                                s.port if self.port is None else self.port,
                                                s.backlog)
        bound = self.listener.getsockname()
        self.inbox = gsocket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.inbox.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.inbox.bind("\0" + self.inbox_addr[1:])
        log.warning("ollama-lb master listening", extra={
            "event": "master_started", "host": bound[0], "port": bound[1], "socket": source,
            "workers": len(self.workers), "pid": os.getpid()})
        done = gevent.event.Event()
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self._stop, done))
        gevent.signal_handler(signal.SIGINT, lambda: gevent.spawn(self._stop, done))
        gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(self._reload))
        loops = [gevent.spawn(self._receive), gevent.spawn(self._supervise),
                 gevent.spawn(self._feed_watchdog)]
        for w in self.workers:
            self._spawn(w)
        done.wait()
        gevent.killall(loops, timeout=1)
        self.inbox.close()
        status = self._aggregate()
        log.warning("master stopped", extra={"event": "master_stopped", "exit_status": status,
                                             "worker_statuses": self.statuses})
        return status

    def _aggregate(self) -> int:
        """0 if every worker drained cleanly, 75 if any cut requests, else 1."""
        if all(code == 0 for code in self.statuses):
            return 0
        return EXIT_CUT if all(code in (0, EXIT_CUT) for code in self.statuses) else 1

    def _worker_watchdog_usec(self) -> int:
        """The WATCHDOG_USEC workers get: the master's own (systemd's), else a default."""
        if notify.watchdog_interval() is not None:
            return int(os.environ["WATCHDOG_USEC"])
        return DEFAULT_WATCHDOG_USEC

    # --- workers ------------------------------------------------------------------------------

    def _argv(self) -> list[str]:
        argv = [sys.executable, "-m", "app", "serve", self.path]
        if self.host:
            argv += ["--host", self.host]
        if self.port is not None:
            argv += ["--port", str(self.port)]
        return argv if self.watch else [*argv, "--no-watch"]

    def _env(self, slot: int) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "WATCHDOG_PID")}
        env.update({WORKER_ENV: str(slot), "LISTEN_FDS": "1", "NOTIFY_SOCKET": self.inbox_addr,
                    "WATCHDOG_USEC": str(self.wd_usec)})
        return env

    def _spawn(self, w: Worker) -> None:
        """Fork and exec one worker with the socket as fd 3; only async-safe calls in between."""
        argv, env, lfd, me = self._argv(), self._env(w.slot), self.listener.fileno(), os.getpid()
        pid = monkey.get_original("os", "fork")()  # the raw fork: no hub reinit, we exec
        if pid == 0:  # the child
            try:
                self._libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)  # master gone: drain, exit
                if os.getppid() != me:
                    os._exit(1)
                if lfd != 3:
                    os.dup2(lfd, 3)
                os.set_inheritable(3, True)
                env["LISTEN_PID"] = str(os.getpid())
                os.execve(sys.executable, argv, env)
            finally:
                os._exit(127)
        w.pid, w.started_at, w.ready, w.last_ping = pid, time.monotonic(), False, 0.0
        log.warning("worker started", extra={"event": "worker_started", "slot": w.slot,
                                             "worker": pid})

    def _supervise(self) -> None:
        """Reap exited workers, start them again after a backoff, kill those that hang."""
        while True:
            now = time.monotonic()
            for w in self.workers:
                if w.pid and self._reaped(w, now):
                    continue
                if not w.pid and not self.stopping and now >= w.restart_at:
                    self._spawn(w)
                elif w.pid and w.ready and now - w.last_ping > self.wd_usec / 1e6:
                    log.error("worker stopped its watchdog pings; killing it", extra={
                        "event": "worker_hung", "slot": w.slot, "worker": w.pid})
                    self._signal(w, signal.SIGKILL)
            gevent.sleep(0.05)

    def _reaped(self, w: Worker, now: float) -> bool:
        """Whether ``w``'s process has exited (then its slot is empty and scheduled)."""
        try:
            pid, raw = os.waitpid(w.pid, os.WNOHANG)
        except ChildProcessError:
            pid, raw = w.pid, 1 << 8
        if pid == 0:
            return False
        code = os.waitstatus_to_exitcode(raw)
        lived = now - w.started_at
        if self.stopping:
            self.statuses.append(code)
        else:
            w.crashes = 0 if lived >= STABLE_S else w.crashes + 1
            delay = min(BACKOFF_S[0] * 2 ** max(w.crashes - 1, 0), BACKOFF_S[1])
            w.restart_at = now + delay
            log.error("worker exited; starting another", extra={
                "event": "worker_exited", "slot": w.slot, "worker": w.pid, "exit_status": code,
                "lived_s": round(lived, 2), "restart_in_s": round(delay, 2)})
        w.pid, w.ready = 0, False
        return True

    def _signal(self, w: Worker, sig: int) -> None:
        if w.pid:
            with contextlib.suppress(ProcessLookupError):  # exited: the supervisor reaps it
                os.kill(w.pid, sig)

    # --- what workers tell the master ---------------------------------------------------------

    def _receive(self) -> None:
        size = socket.CMSG_SPACE(_UCRED.size)
        while True:
            data, ancillary, _, _ = self.inbox.recvmsg(4096, size)
            pid = next((_UCRED.unpack(d[:_UCRED.size])[0] for level, kind, d in ancillary
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), 0)
            w = next((w for w in self.workers if pid and w.pid == pid), None)
            if w is not None:
                self._heard(w, data.decode(errors="replace").splitlines())

    def _heard(self, w: Worker, lines: list[str]) -> None:
        now = time.monotonic()
        for line in lines:
            if line == "READY=1":
                w.ready, w.ready_at, w.last_ping = True, now, now
            elif line == "WATCHDOG=1":
                w.last_ping = now
            elif line.startswith("STATUS="):
                w.status = [line[7:]]
        if not self.announced and all(x.ready for x in self.workers):
            self.announced = True
            log.warning("every worker is ready", extra={
                "event": "workers_ready", "workers": [x.pid for x in self.workers]})
            notify.send(f"READY=1\nSTATUS={self._status()}")

    def _status(self) -> str:
        host, port = self.listener.getsockname()[:2]
        return f"{len(self.workers)} workers serving on {host}:{port}"

    def healthy(self) -> bool:
        """Every slot has a live worker that is ready and pinged within its watchdog time."""
        now = time.monotonic()
        return all(w.pid and w.ready and now - w.last_ping <= self.wd_usec / 1e6
                   for w in self.workers)

    def _feed_watchdog(self) -> None:
        interval = notify.watchdog_interval()
        if interval is None:
            return
        while True:
            if self.announced and self.healthy():
                notify.send("WATCHDOG=1")
            gevent.sleep(interval)

    # --- signals ------------------------------------------------------------------------------

    def _reload(self) -> None:
        """SIGHUP: every worker reloads; READY=1 to systemd once each has said READY again."""
        if self.stopping:
            return
        asked = time.monotonic()
        notify.send("RELOADING=1")
        self._warn_if_workers_changed()
        for w in self.workers:
            self._signal(w, signal.SIGHUP)
        deadline = asked + RELOAD_WAIT_S
        while time.monotonic() < deadline and not all(
                w.ready_at >= asked for w in self.workers if w.pid):
            gevent.sleep(0.05)
        log.warning("workers reloaded", extra={"event": "workers_reloaded", "workers": [
            w.pid for w in self.workers if w.pid and w.ready_at >= asked]})
        notify.send(f"READY=1\nSTATUS={self._status()}")

    def _warn_if_workers_changed(self) -> None:
        try:
            wanted = load_config(self.path).server.workers
        except ConfigError:
            return  # each worker logs the problems itself
        if wanted != len(self.workers):
            log.warning("server.workers changed: the new count applies at restart", extra={
                "event": "config_reload", "restart_required": ["server.workers"],
                "running": len(self.workers), "configured": wanted})

    def _stop(self, done: gevent.event.Event) -> None:
        """SIGTERM: no more restarts; every worker drains as one process would; then exit."""
        if self.stopping:
            return
        self.stopping = True
        notify.send("STOPPING=1\nSTATUS=draining every worker")
        log.warning("master stopping: draining the workers", extra={"event": "stopping"})
        self.listener.close()  # the workers' copies (or systemd's) keep the port as before
        for w in self.workers:
            self._signal(w, signal.SIGTERM)
        bound = self.config.server.drainSeconds + 10.0  # drain + cut grace + stop, per worker
        deadline = time.monotonic() + bound
        while any(w.pid for w in self.workers) and time.monotonic() < deadline:
            gevent.sleep(0.05)
        for w in self.workers:
            if w.pid:
                log.error("worker outlived the drain bound; killed", extra={
                    "event": "worker_killed", "worker": w.pid})
                self._signal(w, signal.SIGKILL)
        while any(w.pid for w in self.workers) and time.monotonic() < deadline + 5:
            gevent.sleep(0.05)
        done.set()
