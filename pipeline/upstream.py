"""Upstream HTTP to the Ollama nodes: ``requests`` used at its transport adapter.

Measured on this kind of machine (design notes §4): ``Session.post`` costs ~700 us of CPU per
small call, most of it in the Session layer (merging settings, reading proxy and netrc
environment, cookies, hooks); ``HTTPAdapter.send`` with a hand-filled ``PreparedRequest`` costs
~300-390 us. The appliance needs none of the Session features, so it fills the prepared request
itself and calls the adapter: connection pooling, timeouts and chunked reading stay requests'.

``Host`` comes from the node URL (an Ollama bound to loopback refuses other hosts), bodies are
sent byte for byte with a Content-Length, and no proxy settings are read from the environment.
"""

from __future__ import annotations

from collections.abc import Iterator

import requests
from requests.adapters import HTTPAdapter
from requests.hooks import default_hooks
from requests.models import PreparedRequest
from requests.structures import CaseInsensitiveDict

STREAM_TYPES = ("application/x-ndjson", "text/event-stream")


class UpstreamClient:
    """One connection pool per node base URL, sized to the node's concurrency cap."""

    def __init__(self) -> None:
        self._adapters: dict[str, HTTPAdapter] = {}

    def _adapter(self, base_url: str, pool_size: int) -> HTTPAdapter:
        adapter = self._adapters.get(base_url)
        if adapter is None:
            # pool_block=False: the appliance bounds concurrency itself; a connection beyond
            # the pool size is opened and closed rather than waited for.
            adapter = HTTPAdapter(pool_connections=1, pool_maxsize=max(pool_size, 1),
                                  max_retries=0, pool_block=False)
            self._adapters[base_url] = adapter
        return adapter

    def send(self, base_url: str, method: str, path: str, body: bytes | None,
             headers: dict[str, str], connect_timeout: float, read_timeout: float | None,
             pool_size: int = 10) -> requests.Response:
        """Send one request; the body of the reply is left unread (streamed)."""
        prepared = PreparedRequest()
        prepared.method = method
        prepared.url = base_url + path
        hdrs = CaseInsensitiveDict(headers)
        if body is not None:
            hdrs["Content-Length"] = str(len(body))
        prepared.headers = hdrs
        prepared.body = body
        prepared.hooks = default_hooks()
        return self._adapter(base_url, pool_size).send(
            prepared, stream=True, timeout=(connect_timeout, read_timeout), proxies={})

    def get_json(self, base_url: str, path: str, connect_timeout: float,
                 read_timeout: float) -> object:
        """A small GET whose JSON reply is read whole (health checks, discovery, merges)."""
        resp = self.send(base_url, "GET", path, None, {"Accept": "application/json"},
                         connect_timeout, read_timeout)
        try:
            resp.raise_for_status()
            return resp.json()
        finally:
            resp.close()

    def close(self) -> None:
        for adapter in self._adapters.values():
            adapter.close()
        self._adapters.clear()

    def forget(self, base_url: str) -> None:
        """Drop a node's pool (its URL changed or it was removed)."""
        adapter = self._adapters.pop(base_url, None)
        if adapter is not None:
            adapter.close()


def is_stream(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() in STREAM_TYPES


def whole_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Regroup transport chunks into whole lines, yielded as soon as each line is complete.

    Bytes are passed through untouched; nothing is added. A chunk holding several complete
    lines is yielded as one piece (one write downstream). A trailing fragment with no newline
    is yielded at EOF.
    """
    pending = bytearray()
    for chunk in chunks:
        if not chunk:
            continue
        end = chunk.rfind(b"\n")
        if end < 0:
            pending += chunk
            continue
        if pending:
            pending += chunk[: end + 1]
            yield bytes(pending)
            pending.clear()
        else:
            yield chunk[: end + 1]
        if end + 1 < len(chunk):
            pending += chunk[end + 1 :]
    if pending:
        yield bytes(pending)
