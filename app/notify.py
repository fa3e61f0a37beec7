"""systemd's notify protocol over $NOTIFY_SOCKET, without a library (one datagram per state).

READY=1 when serving, RELOADING=1 / READY=1 around a reload, STOPPING=1 on shutdown, and
WATCHDOG=1 from a greenlet, but only while the process is healthy. Two ways to be unhealthy
end in the same place, a restart by systemd: the hub stalls (the greenlet cannot run, so the
pings stop by themselves), or a pipeline stage crashed (the hub runs and /health/live answers
503, but nothing would ever be served again: the pinger withholds the pings on purpose).

Every READY=1 is sent after the log line that announces what became ready (started,
workers_ready, workers_reloaded, config_reload): whoever reacts to READY finds it logged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

import gevent

log = logging.getLogger("ollama_lb.notify")


def send(state: str) -> bool:
    """Send one state line; False when not run by systemd (no socket) or on error."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    if state.startswith("RELOADING=1"):
        # systemd >= 253 wants a timestamp with RELOADING; older ones ignore it
        state += f"\nMONOTONIC_USEC={int(time.monotonic() * 1e6)}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(addr)
            sock.sendall(state.encode())
        return True
    except OSError:
        return False


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC in seconds, if systemd asked for pings for this process."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


def start_watchdog(unhealthy: Callable[[], str | None] = lambda: None
                   ) -> gevent.Greenlet | None:
    """Ping every half WATCHDOG_USEC while ``unhealthy()`` is None; None if not asked to.

    When it turns unhealthy the pings stop, once logged and shown in ``systemctl status``;
    systemd then kills and restarts the process when WatchdogSec runs out.
    """
    interval = watchdog_interval()
    if interval is None:
        return None

    def ping() -> None:
        withheld = False
        while True:
            reason = unhealthy()
            if reason is None:
                send("WATCHDOG=1")
                withheld = False
            elif not withheld:
                withheld = True
                send(f"STATUS=unhealthy, watchdog pings withheld: {reason}")
                log.critical("unhealthy: watchdog pings withheld, systemd will restart us",
                             extra={"event": "watchdog_withheld", "reason": reason})
            gevent.sleep(interval)

    return gevent.spawn(ping)
