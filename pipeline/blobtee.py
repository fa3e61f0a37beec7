"""One blob upload streamed to several nodes at once, through a bounded window of pieces.

``ollama create`` uploads model files of many gigabytes, so an upload is never held whole:
the caller ``feed``s the body piece by piece as it reads it from the client, and each target
node has a sender greenlet that sends the pieces on its own connection. Pieces are shared,
not copied, and kept only until the slowest live node has taken them; ``feed`` waits while
that node is ``depth`` pieces behind, so the client is slowed to the slowest node (memory
stays at about ``depth`` pieces whatever the size). A node that takes nothing for the idle
timeout is dropped (``no progress for 300 s``) and the others go on; a node that fails or
answers early (Ollama answers at once when it has the blob) leaves the window at once.

Each upload has a connection of its own (``urllib3``, requests' transport, without the
per-node pool): it is held for the whole body and its size may be unknown (a chunked upload
is forwarded chunked).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import gevent
import urllib3
from gevent.event import Event
from gevent.pool import Group
from urllib3.util import Timeout

from pipeline.reasons import reason
from pipeline.upstream import TRANSPORT_ERRORS

PIECE = 256 * 1024  # what the caller reads from the client at a time
DEPTH = 8  # pieces the slowest node may be behind before the client waits


@dataclass(frozen=True)
class Outcome:
    status: int  # the node's HTTP status; 0: no answer (unreachable, reset, timed out)
    message: str = ""  # the node's error text or the transport failure


class BlobTee:
    """Send one body to ``targets`` (``{node id: base URL}``) as it is fed."""

    def __init__(self, path: str, targets: dict[str, str], length: int | None,
                 idle_s: float, depth: int = DEPTH) -> None:
        self.path = path
        self.targets = dict(targets)
        self.length = length  # Content-Length to forward; None: chunked
        self.idle_s = idle_s
        self.depth = depth
        self.outcomes: dict[str, Outcome] = {}
        self._window: deque[bytes] = deque()
        self._base = 0  # index of _window[0] among all pieces fed
        self._fed = 0  # pieces fed so far
        self._ended = False
        self._cursor = {node_id: 0 for node_id in targets}  # next piece each sender sends
        self._last = {node_id: time.monotonic() for node_id in targets}  # its last piece taken
        self._wake = {node_id: Event() for node_id in targets}
        self._moved = Event()  # a sender took a piece or left
        self._senders = Group()

    @property
    def live(self) -> list[str]:
        """Senders still sending (no outcome yet)."""
        return [n for n in self._cursor if n not in self.outcomes]

    def start(self) -> BlobTee:
        for node_id, url in self.targets.items():
            self._senders.spawn(self._send, node_id, url)
        return self

    # --- the reading side ---------------------------------------------------------------------

    def feed(self, piece: bytes) -> bool:
        """Hand one piece to every live sender, waiting while the slowest is ``depth`` behind.

        False once no sender is left (the rest of the body is not worth reading).
        """
        if not piece:
            return bool(self.live)
        while self.live and self._fed - self._slowest() >= self.depth:
            stalled_for = time.monotonic() - self._last[self._slowest_id()]
            if stalled_for >= self.idle_s:
                self._drop(self._slowest_id(), f"no progress for {self.idle_s:g} s")
                continue
            self._moved.clear()
            self._moved.wait(self.idle_s - stalled_for)
        if not self.live:
            return False
        self._window.append(piece)
        self._fed += 1
        for node_id in self.live:
            self._wake[node_id].set()
        return True

    def finish(self) -> dict[str, Outcome]:
        """The body is complete: wait for every node's answer."""
        self._ended = True
        for event in self._wake.values():
            event.set()
        self._senders.join()
        return self.outcomes

    def abort(self, reason: str) -> None:
        """The body will not be complete (client gone, too large): cut every node's upload,
        so that no node keeps a partial blob."""
        for node_id in self.live:
            self.outcomes[node_id] = Outcome(0, reason)
        self._senders.kill(block=True, timeout=2)
        self._window.clear()

    def _slowest(self) -> int:
        return min((self._cursor[n] for n in self.live), default=self._fed)

    def _slowest_id(self) -> str:
        return min(self.live, key=lambda n: (self._cursor[n], self._last[n]))

    def _drop(self, node_id: str, reason: str) -> None:
        """A node that holds everyone back for too long leaves; its upload is cut."""
        self.outcomes[node_id] = Outcome(0, reason)
        for greenlet in list(self._senders):
            if getattr(greenlet, "node_id", None) == node_id:
                greenlet.kill(block=False)
        self._trim()

    def _trim(self) -> None:
        """Forget the pieces every live sender has taken."""
        keep_from = self._slowest()
        while self._window and self._base < keep_from:
            self._window.popleft()
            self._base += 1

    # --- one node -----------------------------------------------------------------------------

    def _body(self, node_id: str) -> Iterator[bytes]:
        wake = self._wake[node_id]
        while node_id not in self.outcomes:
            i = self._cursor[node_id]
            if i < self._fed:
                piece = self._window[i - self._base]
                self._cursor[node_id] = i + 1
                self._last[node_id] = time.monotonic()
                self._trim()
                self._moved.set()
                yield piece
            elif self._ended:
                return
            else:
                wake.clear()
                wake.wait()

    def _send(self, node_id: str, url: str) -> None:
        gevent.getcurrent().node_id = node_id  # type: ignore[attr-defined]
        try:
            outcome = self._post(node_id, url)
            self.outcomes.setdefault(node_id, outcome)
        finally:  # also when dropped or aborted (killed): the window may move on
            self._trim()
            self._moved.set()

    def _post(self, node_id: str, url: str) -> Outcome:
        headers = {"Content-Type": "application/octet-stream"}
        if self.length is not None:
            headers["Content-Length"] = str(self.length)
        pool = urllib3.connection_from_url(url, maxsize=1)
        try:
            # connect bounded by the idle timeout too: the node answered a HEAD just before,
            # and urllib3 keeps the connect timeout on the socket while the body is sent
            resp = pool.urlopen("POST", self.path, body=self._body(node_id), headers=headers,
                                retries=False, redirect=False, assert_same_host=False,
                                timeout=Timeout(connect=self.idle_s, read=self.idle_s))
            return Outcome(resp.status, _message(resp.data) if resp.status >= 300 else "")
        except TRANSPORT_ERRORS as exc:
            why = reason(exc)
            return Outcome(0, f"no progress for {self.idle_s:g} s" if why == "read timed out"
                           else why)
        finally:
            pool.close()


def _message(body: bytes) -> str:
    """A node's ``{"error": ...}`` as text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode(errors="replace")[:200]
    return str(data.get("error") or data) if isinstance(data, dict) else str(data)[:200]
