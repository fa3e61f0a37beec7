"""Running a simulated node: in-process for tests (port 0), or from the command line."""

from __future__ import annotations

import errno
from typing import Any

from gevent.pywsgi import WSGIHandler, WSGIServer

from app.fakenode.sim import Profile, make_profile
from app.fakenode.sockets import listen, reset
from app.fakenode.wsgi import FakeNode


class _Handler(WSGIHandler):
    """Exposes the connection to the app, for the reset faults, and tracks it."""

    # A reset fault closes the socket under pywsgi's feet: EBADF is expected, not a crash.
    ignored_socket_errors = (*WSGIHandler.ignored_socket_errors, errno.EBADF)

    def handle(self) -> None:
        live, sock = self.server.live_sockets, self.socket
        live.add(sock)
        self.server.node_server.connections += 1
        try:
            super().handle()
        finally:
            live.discard(sock)

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        env["ollama_lb.socket"] = self.socket
        return env

    def log_request(self) -> None:  # the fake node is quiet
        pass


class FakeNodeServer:
    """A FakeNode on a real socket. ``refuse()`` closes the listener (connection refused)."""

    def __init__(self, models: list[str], profile: Profile | None = None, host: str = "127.0.0.1",
                 port: int = 0, **node_args: Any) -> None:
        self.node = FakeNode(models, profile or make_profile("fast"), **node_args)
        self.host = host
        self.port = port
        self._server: WSGIServer | None = None
        self.connections = 0  # TCP connections accepted: a client reusing connections opens few

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> Any:
        return self.node.stats

    def start(self) -> FakeNodeServer:
        listener = listen(self.host, self.port, backlog=1024)
        self.port = listener.getsockname()[1]
        self._server = WSGIServer(listener, self.node, handler_class=_Handler, log=None,
                                  error_log=None)
        self._server.live_sockets = set()  # type: ignore[attr-defined]
        self._server.node_server = self  # type: ignore[attr-defined]
        self._server.start()
        return self

    def refuse(self) -> None:
        """Stop listening and drop every connection, as a dead box does."""
        if self._server is not None:
            server, self._server = self._server, None
            server.close()
            for sock in list(server.live_sockets):  # type: ignore[attr-defined]
                reset(sock)
            server.stop(timeout=0.5)

    def resume(self) -> None:
        if self._server is None:
            self.start()

    def stop(self) -> None:
        self.refuse()

    def __enter__(self) -> FakeNodeServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def serve_forever(models: list[str], port: int, host: str = "127.0.0.1",
                  profile: str = "realistic", fault: str = "none", fault_api: bool = False,
                  library: list[str] | None = None, **overrides: Any) -> None:
    """The ``ollama-lb fake-node`` command (``--fault-api`` turns on the /_fake/* routes;
    ``--library`` limits what pulls find)."""
    import gevent

    prof = make_profile(profile, **overrides)
    server = FakeNodeServer(models, prof, host=host, port=port, fault=fault,
                            fault_api=fault_api, library=library)
    if fault == "refuse":
        print(f"fake node on {host}:{port} refusing connections (--fail refuse)", flush=True)
        gevent.wait()
        return
    server.start()
    control = " fault-api=on" if fault_api else ""
    print(f"fake Ollama node on {server.url} models={','.join(models)} profile={profile}"
          f"{control}", flush=True)
    try:
        gevent.wait()
    except KeyboardInterrupt:
        server.stop()
