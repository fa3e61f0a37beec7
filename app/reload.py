"""Hot reload: a file watch, SIGHUP and POST /admin/reload all take one path.

The new file is validated completely before anything changes. A bad file leaves the running
config in force; the reason (every problem, by key path) is logged, counted, and shown in
/health and GET /admin/config until a good file replaces it. Keys only a restart can apply
are reported as such and keep their running values.

watchdog runs its observer in a native thread, so the process patches everything except
``threading``, ``queue`` and ``select`` (``monkey.patch_all(thread=False, queue=False,
select=False)``): watchdog's threads, queues and its ``poll()`` on the inotify descriptor stay
real and run off the hub. Nothing on the hub blocks on those three: sockets, sleeps, DNS and
subprocesses are still gevent's, and urllib3 only polls sockets with a zero timeout. The
watchdog thread never touches gevent objects: it only calls ``async_.send()`` on a hub
watcher, which is thread-safe, and the debounced reload runs on the hub. The directory is
watched, not the file, because editors and Kubernetes ConfigMaps replace files by rename or
symlink swap.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gevent
from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from pipeline.config import Config, ConfigError, load_config, restart_required
from pipeline.factory import PipelineFactory

log = logging.getLogger("ollama_lb.reload")


class ReloadState:
    """The running config's source and the outcome of the last reload attempt."""

    def __init__(self, path: str | None, factory: PipelineFactory) -> None:
        self.path = path
        self.factory = factory
        self.last: dict[str, Any] = {"result": "initial", "at": time.time()}
        self.hooks: list[Callable[[Config], None]] = []  # e.g. log level, body limit
        self.notify: Callable[[str], None] = lambda state: None  # systemd RELOADING/READY

    def reload(self, trigger: str) -> dict[str, Any]:
        """Validate the file and apply it, or keep the old config and say why."""
        if self.path is None:
            return {"result": "unavailable", "error": "no config file to reload"}
        self.notify("RELOADING=1")
        try:
            return self._reload(trigger)
        finally:
            self.notify("READY=1")

    def _reload(self, trigger: str) -> dict[str, Any]:
        metrics = self.factory.metrics_registry
        try:
            new = load_config(self.path)
        except ConfigError as exc:
            self.last = {"result": "invalid", "trigger": trigger, "at": time.time(),
                         "error": str(exc), "problems": exc.problems}
            metrics.reloads("invalid").inc()
            log.error("config reload rejected; the running config stays in force",
                      extra={"event": "config_reload", "result": "invalid",
                             "trigger": trigger, "problems": exc.problems})
            return self.last
        restart = restart_required(self.factory.config, new)
        changes = self.factory.apply_config(new)
        for hook in self.hooks:
            hook(self.factory.config)
        self.last = {"result": "applied", "trigger": trigger, "at": time.time(),
                     "changes": changes, "restartRequired": restart}
        metrics.reloads("applied").inc()
        log.warning("config reloaded", extra={"event": "config_reload", "result": "applied",
                                              "trigger": trigger, "changes": changes,
                                              "restart_required": restart})
        return self.last

    def summary(self) -> dict[str, Any]:
        return {"source": self.path, "lastReload": self.last}


class _Events(FileSystemEventHandler):
    def __init__(self, names: set[str], wake: Callable[[], None]) -> None:
        self.names = names
        self.wake = wake

    def on_any_event(self, event: FileSystemEvent) -> None:  # runs in watchdog's thread
        paths = {os.fsdecode(event.src_path), os.fsdecode(getattr(event, "dest_path", "") or "")}
        if any(os.path.basename(p) in self.names for p in paths if p):
            self.wake()


class ConfigWatcher:
    """Watches the config file's directory; debounces bursts of events into one reload."""

    def __init__(self, state: ReloadState, debounce_s: float = 0.25) -> None:
        assert state.path is not None
        self.state = state
        self.debounce_s = debounce_s
        self.path = os.path.abspath(state.path)
        self._observer: Any = None
        self._async: Any = None
        self._pending: gevent.Greenlet | None = None
        self._signature = self._stat()

    def _stat(self) -> tuple[Any, ...]:
        try:
            st = os.stat(self.path)  # follows symlinks: a swapped target changes this
            return (st.st_ino, st.st_mtime_ns, st.st_size, os.path.realpath(self.path))
        except OSError:
            return ()

    def start(self) -> None:
        hub = gevent.get_hub()
        self._async = hub.loop.async_()
        self._async.start(self._on_event)
        names = {os.path.basename(self.path)}
        if os.path.islink(self.path):
            names.add(os.path.basename(os.path.realpath(self.path)))
        names.add("..data")  # Kubernetes ConfigMap symlink swap
        self._observer = Observer()
        self._observer.schedule(_Events(names, self._async.send), os.path.dirname(self.path),
                                recursive=False)
        self._observer.daemon = True
        self._observer.start()

    def _on_event(self) -> None:  # on the hub
        if self._pending is None or self._pending.dead:
            self._pending = gevent.spawn_later(self.debounce_s, self._fire)

    def _fire(self) -> None:
        signature = self._stat()
        if signature == self._signature or not signature:
            return  # touched but unchanged, or mid-replace (the next event brings it back)
        self._signature = signature
        self.state.reload("file-watch")

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer = None
        if self._async is not None:
            self._async.stop()
            self._async.close()
            self._async = None
        if self._pending is not None:
            self._pending.kill()
