"""Upstream HTTP to the Ollama nodes: ``requests``' transport, without its Session layer.

Why not ``HTTPAdapter.send``: requests' response building (a ``Response`` object, cookie
extraction through ``http.cookiejar``, header re-wrapping) costs about as much CPU as the
transport itself, and a proxy needs none of it (the figures, with their dates, are in
tests/bench/performance.md). So the appliance keeps requests' ``HTTPAdapter`` for what it is
good at (the per-host pool manager, its connection pools and their connections) and sends
each request on a connection the node's pool lends, without urllib3's ``urlopen`` (retries,
redirects, timeout objects and a response wrapper a proxy that sends once does not use).

``Host`` comes from the node URL (an Ollama bound to loopback refuses other hosts), bodies are
sent byte for byte with a Content-Length, no proxy or netrc settings are read from the
environment, and nothing is retried or redirected behind the appliance's back.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

from gevent.ssl import SSLSocket
from requests.adapters import HTTPAdapter
from urllib3.exceptions import ConnectTimeoutError, ReadTimeoutError
from urllib3.exceptions import HTTPError as Urllib3Error

from pipeline.chunked import ChunkedReader
from pipeline.wire import fast_connections

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")
#: what a failed exchange with a node raises (a reply cut short: http.client's IncompleteRead)
TRANSPORT_ERRORS = (Urllib3Error, OSError, http.client.HTTPException)


class FirstByteTimeout(Exception):
    """No response headers within the first-byte timeout."""


def describe(exc: BaseException) -> str:
    """A short, operator-readable reason for a transport failure."""
    if isinstance(exc, FirstByteTimeout):
        return "timed out waiting for the first byte"
    if isinstance(exc, ConnectTimeoutError):
        return "connect timed out"
    if isinstance(exc, ReadTimeoutError | TimeoutError):
        return "read timed out"
    text = str(exc)
    for marker, reason in (("Read timed out", "read timed out"),
                           ("Connection refused", "connection refused"),
                           ("reset by peer", "connection reset"),
                           ("RemoteDisconnected", "connection closed before a response"),
                           ("Connection aborted", "connection aborted")):
        if marker in text:
            return reason
    return text[:200] or type(exc).__name__


class UpstreamError(Urllib3Error):
    """A node answered with an error status where a JSON reply was required."""


class UpstreamResponse:
    """A node's reply with its body unread; ``close()`` returns or drops the connection.

    It holds the http.client response, the connection it came on and the pool that lent it,
    and gives the connection back exactly once: to the pool if the body was read to its end
    on a connection that stays open, else closed (so a node sees its client leave), with an
    empty place put back so the pool keeps its size. Every response counts as a connection
    checked out of its client until ``close()``, so a leaked one is visible in
    ``UpstreamClient.checked_out``.
    """

    __slots__ = ("_client", "_consumed", "_pool", "closed", "conn", "fp")

    def __init__(self, fp: http.client.HTTPResponse, conn: Any, pool: Any,
                 client: UpstreamClient | None = None) -> None:
        self.fp = fp
        self.conn = conn
        self._pool = pool
        self._consumed = False
        self.closed = False
        self._client = client
        if client is not None:
            client.checked_out += 1

    @property
    def status_code(self) -> int:
        return self.fp.status

    @property
    def headers(self) -> Any:
        return self.fp.headers  # case-insensitive (pipeline.wire.Head)

    @property
    def content(self) -> bytes:
        """The whole body (decoded of any transfer encoding, not of content encoding)."""
        data = self.fp.read()
        self._consumed = True
        return data

    def read1(self, size: int = 65536) -> bytes:
        """What has arrived of the body (at least one byte, at most one HTTP chunk), b"" at its
        end: http.client decodes chunked framing in one call."""
        fp = self.fp
        data = fp.read1(size) if not fp.isclosed() else b""
        if not data:
            self._consumed = True
        return data

    def body_reader(self) -> Callable[[], bytes]:
        """What reads the rest of the body as it arrives, b"" at its end: a chunked body is
        decoded straight off the socket (``pipeline/chunked.py``), anything else through
        http.client. Called before anything of the body was read."""
        sock = self._chunked_socket()
        if sock is None:
            return self.read1
        # a TLS socket's recv decrypts, and may hold decrypted bytes with nothing to read on
        # the socket: it keeps gevent's own recv
        if isinstance(sock, SSLSocket):
            return ChunkedReader(sock.recv, self.fp.fp.read1, self._read_to_end).read
        return self._plain_reader(sock).read

    def stream_reader(self) -> ChunkedReader | None:
        """The reader of a chunked body on a plain socket, which can also be read from the
        hub's loop without waiting (``read_now``); None for any other body. Called before
        anything of the body was read."""
        sock = self._chunked_socket()
        return None if sock is None or isinstance(sock, SSLSocket) else self._plain_reader(sock)

    def _chunked_socket(self) -> Any:
        """The socket a chunked body is decoded from directly; None for any other body."""
        fp = self.fp
        if not fp.chunked or fp.chunk_left is not None or fp.fp is None:
            return None
        return self.conn.sock

    def _plain_reader(self, sock: Any) -> ChunkedReader:
        wait = partial(sock._wait, sock._read_event)  # gevent's, before the socket's own recv
        return ChunkedReader(sock._sock.recv, self.fp.fp.read1, self._read_to_end, wait)

    def _read_to_end(self) -> None:
        """The body ended: the connection can be lent again once the response is closed."""
        self._consumed = True
        self.fp._close_conn()  # type: ignore[attr-defined]  # what http.client does at the end

    def iter_content(self) -> Iterator[bytes]:
        """The body as it arrives: one piece per HTTP chunk, never waiting to fill a buffer."""
        while data := self.read1():
            yield data

    def json(self) -> Any:
        return json.loads(self.content)

    def set_read_timeout(self, seconds: float | None) -> None:
        """Change the socket timeout for the rest of the body (after the headers); None: no
        timeout on each read (a stream's idle timer bounds the silence instead)."""
        sock = self.socket()
        if sock is not None:
            sock.settimeout(seconds)

    def socket(self) -> Any:
        """The connection's socket (None once it is gone)."""
        return self.conn.sock

    def abort(self) -> None:
        """Drop the connection now (a greenlet blocked reading it gets an error)."""
        self.fp.close()
        self.conn.close()

    def close(self) -> None:
        """Keep the connection for reuse if the body was read to its end, else drop it."""
        if self.closed:
            return
        self.closed = True
        if self._client is not None:
            self._client.checked_out -= 1
        conn = self.conn
        if not self._consumed or self.fp.will_close or conn.sock is None:
            self.abort()  # the node sees the client go away
            conn = None
        self._pool._put_conn(conn)  # a closed connection's place comes back empty


class UpstreamClient:
    """One connection pool per node base URL, sized to the node's current concurrency cap.

    A pool whose node's cap changed (a reload) is replaced by one of the new size: connections
    in use on the old one finish their request and are closed instead of returned.
    """

    def __init__(self) -> None:
        self._adapters: dict[str, tuple[int, HTTPAdapter, Any]] = {}
        self.checked_out = 0  # responses handed out and not yet closed

    def _pool(self, base_url: str, pool_size: int | None) -> Any:
        """The node's pool; ``pool_size`` None (probes, fan-outs) keeps whatever size it has."""
        entry = self._adapters.get(base_url)
        if entry is not None and (pool_size is None or entry[0] == max(pool_size, 1)):
            return entry[2]
        size = max(pool_size or 10, 1)
        if entry is not None:
            entry[1].close()
        # pool_block=False: the appliance bounds concurrency itself; a connection beyond
        # the pool size is opened and closed rather than waited for.
        adapter = HTTPAdapter(pool_connections=1, pool_maxsize=size, max_retries=0,
                              pool_block=False)
        pool = fast_connections(adapter.poolmanager.connection_from_url(base_url))
        self._adapters[base_url] = (size, adapter, pool)
        return pool

    def pool_size(self, base_url: str) -> int | None:
        """The size of the pool for a node URL (None before its first request)."""
        entry = self._adapters.get(base_url)
        return entry[0] if entry is not None else None

    def send(self, base_url: str, method: str, path: str, body: bytes | None,
             headers: dict[str, str], connect_timeout: float, read_timeout: float | None,
             pool_size: int | None = None) -> UpstreamResponse:
        """Send one request on a connection of the node's pool; the reply's body is left
        unread (streamed).

        The pool lends the connection (a dropped idle one is reconnected) and takes it back
        when the response is closed. Nothing in between is urllib3's ``urlopen``: it would
        retry, redirect, re-validate the timeout and wrap the reply, none of which a proxy
        that sends each request once wants (see the module docstring).
        """
        pool = self._pool(base_url, pool_size)
        conn = pool._get_conn()
        try:
            conn.timeout = connect_timeout
            conn.request(method, path, body=body, headers=headers)  # connects if it must
            conn.timeout = read_timeout
            conn.sock.settimeout(read_timeout)
            conn._response_options = None
            fp = http.client.HTTPConnection.getresponse(conn)
        except BaseException:
            conn.close()
            pool._put_conn(None)
            raise
        return UpstreamResponse(fp, conn, pool, self)

    def get_json(self, base_url: str, path: str, connect_timeout: float,
                 read_timeout: float) -> object:
        """A small GET whose JSON reply is read whole (health checks, discovery, merges)."""
        resp = self.send(base_url, "GET", path, None, {"Accept": "application/json"},
                         connect_timeout, read_timeout)
        try:
            if resp.status_code >= 400:
                raise UpstreamError(f"HTTP {resp.status_code} from {base_url}{path}")
            return resp.json()
        finally:
            resp.close()

    def close(self) -> None:
        for _size, adapter, _pool in self._adapters.values():
            adapter.close()
        self._adapters.clear()

    def forget(self, base_url: str) -> None:
        """Drop a node's pool (its URL changed or it was removed)."""
        entry = self._adapters.pop(base_url, None)
        if entry is not None:
            entry[1].close()


def is_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in STREAM_TYPES
