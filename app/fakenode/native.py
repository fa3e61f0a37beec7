"""The native Ollama API: generate, chat, embed, embeddings, show, tags, ps, version, ``/``.

Shapes and messages are Ollama's: NDJSON streams with a final ``done`` line
carrying the metrics, load and unload replies for an empty prompt, each endpoint's own wording
for a missing or unknown model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

from app.fakenode import names
from app.fakenode.engine import Engine
from app.fakenode.router import Route, Router
from app.fakenode.sim import Loaded, Simulator, embedding_for
from app.fakenode.store import Model, library_manifest
from app.fakenode.wire import (
    JSON,
    NDJSON,
    Call,
    HTTPError,
    Reply,
    json_reply,
    local_time,
    ndjson_line,
    now_rfc3339,
    parse_keep_alive,
    raw,
    text,
)

Chunk = Callable[[str], dict[str, Any]]
Final = Callable[[str, float, int], dict[str, Any]]


def details(model: str) -> dict[str, Any]:
    family = names.short(model).split(":")[0].split("/")[-1]
    return {"parent_model": "", "format": "gguf", "family": family, "families": [family],
            "parameter_size": "3.2B", "quantization_level": "Q4_K_M"}


class NativeAPI:
    """Handlers for /api/* inference and listings (model management is in manage.py)."""

    def __init__(self, engine: Engine, version: Callable[[], str]) -> None:
        self.engine = engine
        self.sim: Simulator = engine.sim
        self.version = version

    def register(self, router: Router) -> None:
        infer = {"inference": True}
        for method, path, handler, opts in (
                ("GET", "/", self.root, {}), ("GET", "/api/version", self.version_reply, {}),
                ("POST", "/api/generate", self.generate, infer),
                ("POST", "/api/chat", self.chat, infer),
                ("POST", "/api/embed", self.embed, infer),
                ("POST", "/api/embeddings", self.embeddings, infer),
                ("POST", "/api/show", self.show, {}), ("GET", "/api/tags", self.tags, {}),
                ("GET", "/api/ps", self.ps, {})):
            router.add(method, path, Route(handler, **opts))

    # --- liveness and listings ------------------------------------------------------------------

    def root(self, call: Call) -> Reply:
        return text(call.start_response, 200, "Ollama is running")

    def version_reply(self, call: Call) -> Reply:
        return json_reply(call.start_response, 200, {"version": self.version()})

    @staticmethod
    def entry(model: Model) -> dict[str, Any]:
        return {"name": model.name, "model": model.name,
                "modified_at": local_time(model.modified), "size": model.manifest.size,
                "digest": model.manifest.digest, "details": details(model.name)}

    def tags(self, call: Call) -> Reply:
        models = sorted(self.sim.installed.values(), key=lambda m: -m.modified)
        return json_reply(call.start_response, 200, {"models": [self.entry(m) for m in models]})

    def ps(self, call: Call) -> Reply:
        self.sim.expire()
        out = []
        for key, runner in self.sim.loaded.items():
            # a model deleted while loaded stays resident, as its runner does in Ollama
            model = self.sim.installed.get(key) or Model(runner.name,
                                                         library_manifest(runner.name), 0.0)
            entry = self.entry(model)
            entry.pop("modified_at")
            expires = time.time() + runner.keep_alive_s if runner.busy else runner.expires_at
            entry.update(expires_at=local_time(expires), size_vram=entry["size"],
                         context_length=4096)
            out.append(entry)
        out.sort(key=lambda e: e["expires_at"], reverse=True)
        return json_reply(call.start_response, 200, {"models": out})

    def show(self, call: Call) -> Reply:
        name = self.engine.model(call.body, missing_404=False, fallback_name=True)
        model = self.sim.installed[names.key(name)]
        caps = ["embedding"] if model.embedding else ["completion"]
        modelfile = f"FROM {names.short(model.parent or name)}\n"
        reply = {
            "license": "", "modelfile": modelfile + (f'SYSTEM """{model.system}"""\n'
                                                     if model.system else ""),
            "parameters": "stop \"<|eot_id|>\"", "template": "{{ .Prompt }}",
            "details": details(name),
            "model_info": {"general.architecture": "llama", "general.parameter_count": 3212749888,
                           "llama.context_length": 131072},
            "capabilities": caps, "modified_at": local_time(model.modified)}
        if model.system:
            reply["system"] = model.system
        return json_reply(call.start_response, 200, reply)

    # --- generation -----------------------------------------------------------------------------

    def generate(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=True)
        if self.sim.is_embedding(model):
            raise HTTPError(400, f'"{model}" does not support generate')
        prompt = str(body.get("system") or "") + str(body.get("prompt") or "")
        if not body.get("prompt"):
            return self.load_or_unload(call, model, {"response": ""})
        options = body.get("options") or {}
        runner, timing, n = self.engine.infer(model, prompt, body.get("keep_alive"), options)
        context = list(range(1, timing["prompt_eval_count"] + n + 1))
        reason = "length" if "num_predict" in options else "stop"

        def chunk(tok: str) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(), "response": tok, "done": False}

        def final(text_out: str, eval_s: float, count: int) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(), "response": text_out,
                    "done": True, "done_reason": reason, "context": context,
                    **self.engine.final_metrics(timing, count, eval_s)}

        return self.reply(call, runner, prompt, n, chunk, final)

    def chat(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=False)
        messages = body.get("messages") or []
        if not isinstance(messages, list):
            raise HTTPError(400, "json: cannot unmarshal into Go struct field "
                                 "ChatRequest.messages of type []api.Message")
        if not messages:
            return self.load_or_unload(call, model,
                                       {"message": {"role": "assistant", "content": ""}})
        prompt = "\n".join(str(m.get("content") or "") for m in messages if isinstance(m, dict))
        runner, timing, n = self.engine.infer(model, prompt, body.get("keep_alive"),
                                              body.get("options") or {})

        def chunk(tok: str) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(),
                    "message": {"role": "assistant", "content": tok}, "done": False}

        def final(text_out: str, eval_s: float, count: int) -> dict[str, Any]:
            return {"model": model, "created_at": now_rfc3339(),
                    "message": {"role": "assistant", "content": text_out}, "done": True,
                    "done_reason": "stop", **self.engine.final_metrics(timing, count, eval_s)}

        return self.reply(call, runner, prompt, n, chunk, final)

    def reply(self, call: Call, runner: Loaded, prompt: str, n: int, chunk: Chunk,
              final: Final) -> Reply:
        """One NDJSON line per token then the final line, or the final object alone."""
        malformed = call.fault == "malformed"
        if call.stream():
            def lines() -> Iterator[bytes]:
                t0 = time.monotonic()
                count = 0
                for tok in self.engine.tokens(call, prompt, n):
                    count += 1
                    yield ndjson_line(chunk(tok))
                if malformed:
                    yield b'{"model": "broken\n'
                yield ndjson_line(final("", time.monotonic() - t0, count))
            return self.engine.stream(call, NDJSON, lines(), runner)
        t0 = time.monotonic()
        toks = self.engine.collect(call, prompt, n, runner)
        if malformed:
            return raw(call.start_response, 200, JSON, b'{"model": "x", "response": "trunc')
        return json_reply(call.start_response, 200,
                          final("".join(toks), time.monotonic() - t0, len(toks)))

    def load_or_unload(self, call: Call, model: str, extra: dict[str, Any]) -> Reply:
        """An empty prompt loads the model; with keep_alive 0 it unloads without loading."""
        keep = parse_keep_alive(call.body.get("keep_alive"))
        if keep == 0:
            self.sim.unload(model)
            reason = "unload"
        else:
            self.sim.ensure_loaded(model, keep)
            reason = "load"
        return json_reply(call.start_response, 200, {
            "model": model, "created_at": now_rfc3339(), **extra, "done_reason": reason,
            "done": True})

    # --- embeddings -----------------------------------------------------------------------------

    def embed(self, call: Call) -> Reply:
        model = self.engine.model(call.body, missing_404=True, style="pull")
        inputs = call.body.get("input", "")
        if isinstance(inputs, str):
            inputs = [inputs] if inputs else []
        if not isinstance(inputs, list) or not all(isinstance(i, str) for i in inputs):
            raise HTTPError(400, "invalid input type")
        vectors = self.engine.embed_many(model, inputs, call.body)
        reply: dict[str, Any] = {"model": model, "embeddings": vectors}
        if inputs:
            reply.update(total_duration=14143917, load_duration=1019500,
                         prompt_eval_count=sum(max(1, len(i) // 4) for i in inputs))
        return json_reply(call.start_response, 200, reply)

    def embeddings(self, call: Call) -> Reply:
        model = self.engine.model(call.body, missing_404=False, style="pull")
        prompt = call.body.get("prompt") or ""
        if not prompt:
            self.sim.ensure_loaded(model, None)
            return json_reply(call.start_response, 200, {"embedding": []})
        self.engine.embed_many(model, [], call.body)
        return json_reply(call.start_response, 200,
                          {"embedding": embedding_for(prompt, 16, normalise=False)})

