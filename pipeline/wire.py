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
from typing import Any


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


def fast_connections(pool: Any) -> Any:
    """Make a urllib3 pool's connections read response heads with ``FastResponse``."""
    base = pool.ConnectionCls
    pool.ConnectionCls = type(f"Fast{base.__name__}", (base,), {"response_class": FastResponse})
    return pool
