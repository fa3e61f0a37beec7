"""Model management: pull, push, create, copy, delete, and blobs."""

from __future__ import annotations

import hashlib
import json
import re
import time
from typing import Any

from app.fakenode import names
from app.fakenode.engine import Engine
from app.fakenode.router import Route, Router
from app.fakenode.sim import Simulator
from app.fakenode.wire import Call, HTTPError, Reply, empty, json_reply, read_body

_DIGEST = re.compile(r"sha256[:-][0-9a-f]{64}")


class ManageAPI:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sim: Simulator = engine.sim
        self.blobs: set[str] = set()

    def register(self, router: Router) -> None:
        router.add("POST", "/api/pull", Route(self.pull))
        router.add("POST", "/api/push", Route(self.push))
        router.add("POST", "/api/create", Route(self.create))
        router.add("POST", "/api/copy", Route(self.copy))
        router.add("DELETE", "/api/delete", Route(self.delete))
        router.add_prefix(("HEAD", "POST"), "/api/blobs/",
                          Route(self.blob, faultable=False, json_body=False))

    def progress(self, call: Call, steps: list[dict[str, Any]]) -> Reply:
        if call.body.get("stream", True) is False:
            return json_reply(call.start_response, 200, steps[-1])
        call.start_response("200 OK", [("Content-Type", "application/x-ndjson")])
        return [json.dumps(s).encode() + b"\n" for s in steps]

    def push(self, call: Call) -> Reply:
        self.engine.model(call.body, missing_404=False, fallback_name=True)
        return self.progress(call, [{"status": "retrieving manifest"},
                                    {"status": "pushing manifest"}, {"status": "success"}])

    def pull(self, call: Call) -> Reply:
        model = call.body.get("model") or call.body.get("name") or ""
        if not model:
            raise HTTPError(400, "invalid model name")
        key = names.key(model)
        self.sim.installed.setdefault(key, names.short(model))
        self.sim.modified.setdefault(key, time.time())
        return self.progress(call, [{"status": "pulling manifest"},
                                    {"status": "verifying sha256 digest"},
                                    {"status": "writing manifest"}, {"status": "success"}])

    def delete(self, call: Call) -> Reply:
        model = self.engine.model(call.body, missing_404=False, fallback_name=True)
        self.sim.installed.pop(names.key(model), None)
        self.sim.unload(model)
        return empty(call.start_response)

    def copy(self, call: Call) -> Reply:
        src, dst = call.body.get("source") or "", call.body.get("destination") or ""
        if not self.sim.has(src):
            raise HTTPError(404, f'model "{src}" not found')
        if not dst:
            raise HTTPError(400, "invalid model name")
        self.sim.installed[names.key(dst)] = names.short(dst)
        self.sim.modified[names.key(dst)] = time.time()
        return empty(call.start_response)

    def create(self, call: Call) -> Reply:
        model = call.body.get("model") or call.body.get("name") or ""
        source = call.body.get("from")
        if not model:
            raise HTTPError(400, "model is required")
        if source and not self.sim.has(str(source)):
            raise HTTPError(404, f"model '{source}' not found")
        self.sim.installed[names.key(model)] = names.short(model)
        self.sim.modified[names.key(model)] = time.time()
        return self.progress(call, [{"status": "using existing layer"},
                                    {"status": "writing manifest"}, {"status": "success"}])

    def blob(self, call: Call) -> Reply:
        sr = call.start_response
        digest = call.path[len("/api/blobs/"):]
        if not _DIGEST.fullmatch(digest):
            return json_reply(sr, 400, {"error": "invalid digest format"})
        if call.method == "HEAD":
            return empty(sr, 200 if digest in self.blobs else 404)
        data = read_body(call.environ)
        got = "sha256:" + hashlib.sha256(data).hexdigest()
        if got.replace(":", "-") != digest.replace(":", "-"):
            return json_reply(sr, 400, {"error": f'digest mismatch, expected "{digest}", got '
                                        f'"{got}"'})
        existed = digest in self.blobs
        self.blobs.add(digest)
        return empty(sr, 200 if existed else 201)
