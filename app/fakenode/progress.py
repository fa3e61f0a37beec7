"""Progress streams for pull, push and create, answered as Ollama's ``streamResponse`` does.

A job is a generator of status objects that raises ``JobFailed`` when it fails. Streamed
(the default), each object is one NDJSON line; a failure before the first line is a plain
JSON error with its status (500 unless the job says 400), a failure after it is one more
``{"error": ...}`` line under the 200 already sent. With ``stream:false`` the reply is the
last status, or the error with its status (``waitForStream``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import gevent

from app.fakenode.sim import Simulator
from app.fakenode.store import Blob, Layer
from app.fakenode.wire import NDJSON, Call, Reply, json_reply, ndjson_line

Status = dict[str, Any]
Job = Iterator[Status]
CHUNK = 64 * 1024 * 1024  # one progress line per 64 MiB moved


class JobFailed(Exception):
    def __init__(self, message: str, status: int = 500) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def reply(call: Call, job: Job) -> Reply:
    sr = call.start_response
    if not call.stream():
        last: Status = {}
        try:
            for status in job:
                last = status
        except JobFailed as exc:
            return json_reply(sr, exc.status, {"error": exc.message})
        return json_reply(sr, 200, last)
    try:
        first = next(job)
    except JobFailed as exc:
        return json_reply(sr, exc.status, {"error": exc.message})
    except StopIteration:
        return json_reply(sr, 500, {"error": "unknown error"})
    sr("200 OK", [("Content-Type", NDJSON)])
    return _lines(first, job)


def _lines(first: Status, job: Job) -> Iterator[bytes]:
    yield ndjson_line(first)
    try:
        for status in job:
            yield ndjson_line(status)
    except JobFailed as exc:
        yield ndjson_line({"error": exc.message})


def transfer(sim: Simulator, layer: Layer, verb: str) -> Job:
    """One layer's lines: ``pulling <12 hex>`` (or ``pushing``) with ``digest``, ``total``
    and a ``completed`` that only grows, paced by the profile's ``pull_bps``. A layer the
    node already has is reported complete at once, as Ollama reports a blob it skips."""
    base = {"status": f"{verb} {layer.short}", "digest": layer.digest, "total": layer.size}
    if verb == "pulling" and layer.digest in sim.blobs:
        yield {**base, "completed": layer.size}
        return
    yield dict(base)  # before the first bytes: no "completed" yet
    rate = sim.profile.pull_bps
    steps = max(1, min(32, -(-layer.size // CHUNK)))
    done = 0
    for i in range(1, steps + 1):
        target = layer.size * i // steps
        if rate:
            gevent.sleep((target - done) / rate)
        done = target
        yield {**base, "completed": done}
    if verb == "pulling":
        sim.blobs[layer.digest] = Blob(layer.size)
