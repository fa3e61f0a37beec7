"""Model management: pull, push, create, copy and delete, as the reference describes them.

A pull fetches the registry's manifest, then each layer with monotonic per-layer progress
(``pulling <12 hex>``, ``digest``, ``total``, ``completed``), then verifies, writes the
manifest and says ``success``; an unknown model fails after ``pulling manifest`` with
``pull model manifest: file does not exist``. Create builds on an installed model, on a
library model it pulls first (its progress, ``success`` included, streams ahead of create's
own lines, as Ollama's does), or on uploaded GGUF blobs (``files``).
"""

from __future__ import annotations

from typing import Any

from app.fakenode import names, progress
from app.fakenode.blobs import parse_digest
from app.fakenode.engine import Engine
from app.fakenode.progress import Job, JobFailed, transfer
from app.fakenode.router import Route, Router
from app.fakenode.sim import Simulator
from app.fakenode.store import (
    MODEL,
    SYSTEM,
    TEMPLATE,
    Blob,
    Layer,
    Manifest,
    gguf_manifest,
    is_embedding_name,
    text_layer,
)
from app.fakenode.wire import Call, HTTPError, Reply, empty

BLOB_DIR = "/root/.ollama/models/blobs"  # where a real node would look, for error texts


def pull_job(sim: Simulator, name: str) -> Job:
    yield {"status": "pulling manifest"}
    manifest = sim.library.manifest(name)
    if manifest is None:
        raise JobFailed("pull model manifest: file does not exist")
    for layer in manifest.blobs:
        yield from transfer(sim, layer, "pulling")
    yield {"status": "verifying sha256 digest"}
    gone = sim.install(name, manifest, is_embedding_name(name))
    yield {"status": "writing manifest"}
    if gone:  # a re-pull that replaced layers
        yield {"status": "removing unused layers"}
    yield {"status": "success"}


def push_job(sim: Simulator, manifest: Manifest) -> Job:
    yield {"status": "retrieving manifest"}
    for layer in manifest.blobs:
        yield from transfer(sim, layer, "pushing")
    yield {"status": "pushing manifest"}
    yield {"status": "success"}


def gguf_files(sim: Simulator, files: Any) -> Layer:
    """The weights a ``files`` map names, checked before any progress is sent."""
    if not isinstance(files, dict) or not files:
        raise HTTPError(400, "no files provided to convert")
    chosen = sorted(files.items(), key=lambda kv: not str(kv[0]).endswith(".gguf"))[0]
    digest = parse_digest(str(chosen[1]))
    if digest is None:
        raise HTTPError(400, "invalid digest format")
    blob = sim.blobs.get(digest)
    if blob is None:
        raise HTTPError(400, f"open {BLOB_DIR}/{digest.replace(':', '-')}: no such file or "
                             "directory")
    return Layer(MODEL, digest, blob.size)


class ManageAPI:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sim: Simulator = engine.sim

    def register(self, router: Router) -> None:
        router.add("POST", "/api/pull", Route(self.pull))
        router.add("POST", "/api/push", Route(self.push))
        router.add("POST", "/api/create", Route(self.create))
        router.add("POST", "/api/copy", Route(self.copy))
        router.add("DELETE", "/api/delete", Route(self.delete))

    def pull(self, call: Call) -> Reply:
        name = call.body.get("model") or call.body.get("name") or ""
        if not isinstance(name, str) or not names.is_valid(name):
            raise HTTPError(400, "invalid model name")
        return progress.reply(call, pull_job(self.sim, name))

    def push(self, call: Call) -> Reply:
        name = self.engine.model(call.body, missing_404=False, fallback_name=True)
        return progress.reply(call, push_job(self.sim, self.sim.installed[names.key(name)]
                                             .manifest))

    def delete(self, call: Call) -> Reply:
        name = self.engine.model(call.body, missing_404=False, fallback_name=True)
        self.sim.remove(name)
        return empty(call.start_response)

    def copy(self, call: Call) -> Reply:
        src = str(call.body.get("source") or "")
        dst = str(call.body.get("destination") or "")
        if not names.is_valid(src):
            raise HTTPError(400, f'source "{src}" is invalid')
        if not names.is_valid(dst):
            raise HTTPError(400, f'destination "{dst}" is invalid')
        model = self.sim.get(src)
        if model is None:
            raise HTTPError(404, f'model "{src}" not found')
        self.sim.install(dst, model.manifest, model.embedding, model.system, model.parent)
        return empty(call.start_response)

    def create(self, call: Call) -> Reply:
        body = call.body
        name = body.get("model") or body.get("name") or ""
        if not isinstance(name, str) or not names.is_valid(name):
            raise HTTPError(400, "invalid model name")
        weights = gguf_files(self.sim, body["files"]) if body.get("files") else None
        return progress.reply(call, self.create_job(name, body, weights))

    def create_job(self, name: str, body: dict[str, Any], weights: Layer | None) -> Job:
        source = body.get("from")
        if source:
            if not isinstance(source, str) or not names.is_valid(source):
                raise JobFailed("invalid model name", 400)
            if not self.sim.has(source):  # a library model: pulled first, as Ollama does
                yield from pull_job(self.sim, source)
            base = self.sim.installed[names.key(source)]
            manifest, embedding, parent = base.manifest, base.embedding, base.parent or base.name
            inherited = base.system
        elif weights is not None:
            yield {"status": "parsing GGUF"}
            if not self.sim.blobs[weights.digest].magic.startswith(b"GGUF"):
                raise JobFailed("supplied file was not in GGUF format", 400)
            manifest, embedding, parent, inherited = gguf_manifest(weights), False, "", ""
        else:
            raise JobFailed("neither 'from' or 'files' was specified", 400)
        for layer in manifest.layers:
            yield {"status": f"using existing layer {layer.digest}"}
        system = body.get("system") if isinstance(body.get("system"), str) else ""
        for media, text in ((TEMPLATE, body.get("template")), (SYSTEM, system)):
            if isinstance(text, str) and text:
                layer = text_layer(media, text)
                verb = "using existing" if layer.digest in self.sim.blobs else "creating new"
                yield {"status": f"{verb} layer {layer.digest}"}
                self.sim.blobs[layer.digest] = Blob(layer.size, text.encode()[:8])
                manifest = manifest.with_layer(layer)
        yield {"status": "writing manifest"}
        self.sim.blobs.setdefault(manifest.config.digest, Blob(manifest.config.size))
        self.sim.install(name, manifest, embedding, system or inherited, parent)
        yield {"status": "success"}
