"""systemd's notify protocol over $NOTIFY_SOCKET, without a library (one datagram per state).

READY=1 when serving, RELOADING=1 / READY=1 around a reload, STOPPING=1 on shutdown, and
WATCHDOG=1 from a greenlet: if the hub stalls, the pings stop and systemd restarts us.
"""

from __future__ import annotations

import os
import socket
import time

import gevent


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


def start_watchdog() -> gevent.Greenlet | None:
    interval = watchdog_interval()
    if interval is None:
        return None

    def ping() -> None:
        while True:
            send("WATCHDOG=1")
            gevent.sleep(interval)

    return gevent.spawn(ping)
