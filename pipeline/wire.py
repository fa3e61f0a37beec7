"""Reading a node's response head without the ``email`` package.

http.client parses response headers with ``email.feedparser`` into an ``email.message``
object, and urllib3 then copies them into its own header dict: about 150 Python calls for the
half-dozen headers an Ollama reply carries. ``FastResponse`` reads the same lines with the same
limits (http.client's ``_read_headers``) into a small mapping that answers what http.client
and urllib3 ask of it (``get``, ``items``, ``get_all``), and keeps http.client's status-line,
framing and keep-alive logic.
"""

from __future__ import annotations

import http.client
import queue
import re
from typing import Any

from urllib3.connection import _get_default_user_agent as _default_user_agent
from urllib3.connection import _ResponseOptions


class Head(http.client.HTTPMessage):
    """Response headers as parsed lines: first value wins for ``get``, as with email."""

    def __init__(self, pairs: list[tuple[str, str]]) -> None:  # no email parsing state
        self._headers = pairs
        self._first: dict[str, str] = {}
        for name, value in pairs:
            self._first.setdefault(name.lower(), value)
        self.defects: list[Any] = []  # what urllib3's header check reads

    def is_multipart(self) -> bool:
        return False

    def get_payload(self, *args: Any, **kwargs: Any) -> Any:
        return None  # the head carries no body

    def __delitem__(self, name: str) -> None:
        key = name.lower()
        self._headers = [(k, v) for k, v in self._headers if k.lower() != key]
        self._first.pop(key, None)

    def get(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        return self._first.get(name.lower(), failobj)

    def get_all(self, name: str, failobj: Any = None) -> Any:  # type: ignore[override]
        key = name.lower()
        found = [v for k, v in self._headers if k.lower() == key]
        return found or failobj

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]
        return list(self._headers)

    def keys(self) -> list[str]:  # type: ignore[override]
        return [k for k, _ in self._headers]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._first

    def __getitem__(self, name: str) -> Any:
        return self._first.get(name.lower())

    def __len__(self) -> int:
        return len(self._headers)

    def getlist(self, name: str) -> list[str]:
        """Every value of a header, as urllib3's header dict answers it."""
        return self.get_all(name) or []


def read_head(fp: Any) -> Head:
    """Header lines up to the blank line (http.client's limits), folded lines joined."""
    pairs: list[tuple[str, str]] = []
    for raw in http.client._read_headers(fp):  # type: ignore[attr-defined]
        line = raw.decode("iso-8859-1")
        if line[:1] in (" ", "\t") and pairs:  # obsolete line folding
            name, value = pairs[-1]
            pairs[-1] = (name, value + " " + line.strip())
            continue
        name, sep, value = line.partition(":")
        if sep:
            pairs.append((name.strip(), value.strip()))
    return Head(pairs)


class FastResponse(http.client.HTTPResponse):
    def begin(self) -> None:
        """http.client's ``begin`` with ``read_head`` in place of ``parse_headers``."""
        if self.headers is not None:
            return
        while True:
            version, status, reason = self._read_status()  # type: ignore[attr-defined]
            if status != http.client.CONTINUE:
                break
            http.client._read_headers(self.fp)  # type: ignore[attr-defined]
        self.code = self.status = status
        self.reason = reason.strip()
        if version in ("HTTP/1.0", "HTTP/0.9"):
            self.version = 10
        elif version.startswith("HTTP/1."):
            self.version = 11
        else:
            raise http.client.UnknownProtocol(version)
        self.headers = self.msg = read_head(self.fp)
        tr_enc = self.headers.get("transfer-encoding")
        self.chunked = bool(tr_enc and tr_enc.lower() == "chunked")
        self.chunk_left = None
        self.will_close = self._check_close()  # type: ignore[attr-defined]
        self.length = None
        length = self.headers.get("content-length")
        if length and not self.chunked:
            try:
                self.length = int(length)
            except ValueError:
                self.length = None
            else:
                if self.length < 0:
                    self.length = None
        if (status in (http.client.NO_CONTENT, http.client.NOT_MODIFIED)
                or 100 <= status < 200 or self._method == "HEAD"):  # type: ignore[attr-defined]
            self.length = 0
        if not self.will_close and not self.chunked and self.length is None:
            self.will_close = True


ONE_WRITE = 64 * 1024  # a body up to this size leaves with the head
_UNSAFE_PATH = re.compile(r"[^\x21-\x7e]")  # what http.client refuses, and any non-ASCII
_CS_IDLE, _CS_REQ_SENT = http.client._CS_IDLE, http.client._CS_REQ_SENT  # type: ignore[attr-defined]


class OneWriteRequest:
    """urllib3's ``HTTPConnection.request`` for a bytes body: the head and the body in one send.

    urllib3 puts the request line and each header through http.client one call at a time and
    sends the head and the body separately: about a hundred Python calls, and two segments for
    the node to wake up for. The appliance always sends a known-length body (or none) with
    headers it built itself, so the request is formatted in one piece here; anything else
    (a body that is not bytes, a path or header value http.client would refuse, a connection
    not idle) takes urllib3's own path, with its own checks and errors.
    """

    host: str
    port: int
    default_port: int
    sock: Any
    timeout: Any
    _response_options: Any

    def request(self, method: str, url: str, body: Any = None, headers: Any = None,
                **kw: Any) -> None:
        head = self._head(method, url, body, headers) if not kw.get("chunked") else None
        if head is None:
            super().request(method, url, body=body, headers=headers, **kw)  # type: ignore[misc]
            return
        if self.sock is None:
            self.connect()  # type: ignore[attr-defined]
        else:
            self.sock.settimeout(self.timeout)
        self._response_options = _ResponseOptions(
            request_method=method, request_url=url,
            preload_content=kw.get("preload_content", True),
            decode_content=kw.get("decode_content", True),
            enforce_content_length=kw.get("enforce_content_length", True))
        self._method = method
        self._HTTPConnection__state = _CS_REQ_SENT
        if body and len(body) <= ONE_WRITE:
            self.sock.sendall(head + body)
        else:  # a large body is not copied just to save a send
            self.sock.sendall(head)
            if body:
                self.sock.sendall(body)

    def _head(self, method: str, url: str, body: Any, headers: Any) -> bytes | None:
        """The request's head, or None where urllib3's own path must take it."""
        state = self.__dict__.get("_HTTPConnection__state")
        response = self.__dict__.get("_HTTPConnection__response")
        if response is not None and response.isclosed():
            self._HTTPConnection__response = response = None
        if (state != _CS_IDLE or response is not None or not isinstance(body, bytes | None)
                or _UNSAFE_PATH.search(url) or not method.isalpha()):
            return None
        headers = headers or {}
        if any("\r" in value or "\n" in value for value in headers.values()):
            return None
        given = [f"{name}: {value}" for name, value in headers.items()]
        names = {name.lower() for name in headers}
        lines = [f"{method} {url} HTTP/1.1"]
        if "host" not in names:
            lines.append(f"Host: {self._host_header()}")
        if "accept-encoding" not in names:
            lines.append("Accept-Encoding: identity")
        lines += given
        if body is not None and "content-length" not in names:
            lines.append(f"Content-Length: {len(body)}")
        if "user-agent" not in names:
            lines.append(f"User-Agent: {_default_user_agent()}")
        try:
            return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        except UnicodeEncodeError:
            return None

    def _host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == self.default_port else f"{host}:{self.port}"


class PoolSlots:
    """A urllib3 pool's idle connections as a plain list, last in first out.

    urllib3 keeps them in a ``queue.LifoQueue``, made for threads: its lock and condition
    variable cost about twenty Python calls for each lend and return, on every request. The
    appliance lends from one thread (greenlets), never blocks for a connection (its pools do
    not block), so a list answers what urllib3 asks (``get``/``put`` without blocking, raising
    ``queue.Empty``/``queue.Full`` as the queue does).
    """

    __slots__ = ("items", "maxsize")

    def __init__(self, old: queue.LifoQueue[Any]) -> None:
        self.maxsize = old.maxsize
        self.items: list[Any] = []
        while True:  # the pool's initial places (None: a connection not made yet)
            try:
                self.items.append(old.get(block=False))
            except queue.Empty:
                break
        self.items.reverse()  # the queue's next-out is the list's last

    def get(self, block: bool = True, timeout: float | None = None) -> Any:
        try:
            return self.items.pop()
        except IndexError:
            raise queue.Empty from None

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        if len(self.items) >= self.maxsize > 0:
            raise queue.Full
        self.items.append(item)

    def qsize(self) -> int:
        return len(self.items)


def fast_connections(pool: Any) -> Any:
    """Make a urllib3 pool's connections send each request in one write and read response
    heads with ``FastResponse``, and keep its idle connections in a list."""
    base = pool.ConnectionCls
    pool.ConnectionCls = type(f"Fast{base.__name__}", (OneWriteRequest, base),
                              {"response_class": FastResponse})
    pool.pool = PoolSlots(pool.pool)
    return pool
