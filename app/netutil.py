"""Listening and accepted sockets: TCP_NODELAY, SO_KEEPALIVE, backlog, systemd socket takeover.

gevent's pywsgi writes headers and body separately; with Nagle on, every small reply on a
kept-alive connection waits ~40 ms for the peer's delayed ACK (measured: ~22 req/s per
connection), and token streams need every line sent at once. SO_KEEPALIVE makes the kernel
probe a silent client, so the keepalive sysctls shipped in deploy/ find a client that vanished
mid-stream in minutes instead of hours. Linux copies both options from a listener to the
sockets it accepts; ``tune_accepted`` sets them again anyway, because a listener handed over
by systemd may come from a socket unit that does not set them.

Socket activation (``sd_listen_fds``, done here without a library): systemd opens the
listening socket in ``ollama-lb.socket`` and passes it as fd 3 with ``LISTEN_FDS=1`` and
``LISTEN_PID=<our pid>``. The socket outlives the process, so during a restart or an upgrade
new connections wait in the kernel's accept queue instead of being refused.
"""

from __future__ import annotations

import contextlib
import os
import socket

from gevent import socket as gsocket

SD_LISTEN_FDS_START = 3  # the first fd systemd passes (sd_listen_fds(3))


def _tune_listener(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def make_listener(host: str, port: int, backlog: int = 1024) -> gsocket.socket:
    """A bound, listening gevent socket (port 0 picks a free port)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = gsocket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    _tune_listener(sock)
    sock.bind((host, port))
    sock.listen(backlog)
    return sock


def tune_accepted(sock: socket.socket) -> None:
    """TCP_NODELAY and SO_KEEPALIVE on an accepted client socket (two cheap syscalls)."""
    with contextlib.suppress(OSError):  # not TCP (a unix socket in a test): nothing to tune
        _tune_listener(sock)


def listen_fds(unset_environment: bool = True) -> list[int]:
    """The fds systemd passed to this process, per sd_listen_fds(3); [] when none.

    ``LISTEN_PID`` must name this process: the variables may have been inherited from a
    parent that was activated itself. They are removed afterwards (as sd_listen_fds does with
    ``unset_environment``) so that a child we start never takes the socket over again, and the
    fds are marked close-on-exec for the same reason.
    """
    pid, count = os.environ.get("LISTEN_PID", ""), os.environ.get("LISTEN_FDS", "")
    if unset_environment:
        for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(var, None)
    if not (pid.isdigit() and count.isdigit()) or int(pid) != os.getpid():
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + int(count)))
    for fd in fds:
        os.set_inheritable(fd, False)
    return fds


def adopt_listener(fd: int) -> gsocket.socket:
    """Wrap an inherited listening TCP socket as a gevent socket, with our options set.

    Refuses an fd that is not a listening stream socket (a socket unit with a datagram or
    FIFO listener would otherwise fail later, confusingly, in accept()).
    """
    sock = gsocket.socket(fileno=fd)
    if sock.type != socket.SOCK_STREAM or not sock.getsockopt(socket.SOL_SOCKET,
                                                               socket.SO_ACCEPTCONN):
        sock.detach()
        raise OSError(f"fd {fd} from systemd is not a listening stream socket")
    sock.setblocking(False)
    if sock.family in (socket.AF_INET, socket.AF_INET6):
        _tune_listener(sock)
    return sock


def abort(sock: socket.socket | None) -> None:
    """Close with RST instead of FIN (SO_LINGER 0): what a crashed peer looks like."""
    if sock is None:
        return
    try:
        linger_rst(sock)
        # close() waits for makefile() references (pywsgi holds one); the real close does not
        getattr(sock, "_real_close", sock.close)()
    except OSError:
        pass


def linger_rst(sock: socket.socket) -> None:
    """Make the next close() send RST and drop unsent data at once (SO_LINGER 0).

    For a client that stopped reading: a FIN would queue behind the data it never takes, and
    the kernel would keep the orphaned socket and its buffers for minutes.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
