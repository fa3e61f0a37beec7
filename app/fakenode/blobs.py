"""``HEAD`` and ``POST /api/blobs/:digest``: the uploads ``ollama create`` builds models from.

An upload is hashed as it is read, in 1 MiB pieces, and never held whole: a 200 MB GGUF costs
the node one piece of memory, as the real server streams it to disk. The node keeps the
blob's size and first bytes (create checks the GGUF magic), not its content. As in Ollama, a
blob the node already has is answered 200 without reading the body (pywsgi discards it),
a new one 201 once its sha256 matches the path, and a mismatch 400.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from app.fakenode.router import Route, Router
from app.fakenode.sim import Simulator
from app.fakenode.store import Blob
from app.fakenode.wire import Call, Reply, empty, json_reply

PIECE = 1024 * 1024
PREFIX = "/api/blobs/"
_DIGEST = re.compile(r"sha256[:-]([0-9a-f]{64})")


def parse_digest(text: str) -> str | None:
    """``sha256:<hex>`` for either spelling Ollama accepts (":" or "-"), else None."""
    match = _DIGEST.fullmatch(text)
    return f"sha256:{match.group(1)}" if match else None


def hash_body(environ: dict[str, Any]) -> tuple[str, int, bytes]:
    """Digest, size and first bytes of a request body, read piece by piece."""
    stream = environ["wsgi.input"]
    left = int(environ.get("CONTENT_LENGTH") or 0) or None  # None: chunked, read to the end
    digest, size, head = hashlib.sha256(), 0, b""
    while left is None or left > 0:
        piece = stream.read(PIECE if left is None else min(PIECE, left))
        if not piece:
            break
        digest.update(piece)
        if len(head) < 8:
            head += piece[:8 - len(head)]
        size += len(piece)
        if left is not None:
            left -= len(piece)
    return "sha256:" + digest.hexdigest(), size, head


class BlobsAPI:
    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    def register(self, router: Router) -> None:
        router.add_prefix(("HEAD", "POST"), PREFIX,
                          Route(self.blob, faultable=False, json_body=False))

    def blob(self, call: Call) -> Reply:
        sr = call.start_response
        given = call.path[len(PREFIX):]
        digest = parse_digest(given)
        if digest is None:
            return json_reply(sr, 400, {"error": "invalid digest format"})
        if call.method == "HEAD":
            return empty(sr, 200 if digest in self.sim.blobs else 404)
        if digest in self.sim.blobs:
            return empty(sr, 200)
        try:
            got, size, head = hash_body(call.environ)
        except OSError:  # the uploader left mid-body: Ollama's io.Copy fails the same way
            return json_reply(sr, 500, {"error": "unexpected EOF"})
        if got != digest:
            return json_reply(sr, 400, {
                "error": f'digest mismatch, expected "{given}", got "{got}"'})
        self.sim.blobs[digest] = Blob(size, head)
        return empty(sr, 201)
