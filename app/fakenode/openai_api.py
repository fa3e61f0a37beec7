"""The OpenAI-compatible API Ollama serves under /v1: chat, completions, embeddings, models.

Ollama translates these around its native handlers, so status codes match the
native ones and error bodies take OpenAI's shape. Streams are SSE ``data:`` frames ending with
``data: [DONE]``; the chat stream has a separate finish chunk, as current servers send it.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

from app.fakenode import names
from app.fakenode.engine import Engine
from app.fakenode.router import Route, Router
from app.fakenode.sim import Simulator
from app.fakenode.wire import (
    SSE,
    Call,
    HTTPError,
    Reply,
    json_reply,
    openai_error,
    sse_data,
)


def content_text(content: Any) -> str:
    """A message's text: a plain string, or the text parts of a content array."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def usage(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def max_tokens(body: dict[str, Any]) -> dict[str, Any]:
    """``max_tokens`` becomes ``num_predict``, as Ollama maps it."""
    return {"num_predict": body["max_tokens"]} if isinstance(body.get("max_tokens"), int) else {}


class OpenAIAPI:
    """Handlers for /v1/chat/completions, /v1/completions, /v1/embeddings, /v1/models."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.sim: Simulator = engine.sim

    def register(self, router: Router) -> None:
        # A full queue and the 500/503 faults answer in the native shape on these routes,
        # as this simulator always has (see the README's note on the simulated node).
        infer = {"shape": openai_error, "inference": True}
        router.add("POST", "/v1/chat/completions", Route(self.chat, **infer))
        router.add("POST", "/v1/completions", Route(self.completions, **infer))
        router.add("POST", "/v1/embeddings", Route(self.embeddings, **infer))
        router.add("GET", "/v1/models", Route(self.models, shape=openai_error))
        router.add_prefix(("GET", "HEAD"), "/v1/models/", Route(self.model, shape=openai_error))

    def chat(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=False)
        messages = body.get("messages")
        if not messages:
            raise HTTPError(400, "[] is too short - 'messages'")
        prompt = "\n".join(content_text(m.get("content")) for m in messages
                           if isinstance(m, dict))
        opts = max_tokens(body)
        runner, timing, n = self.engine.infer(model, prompt, None, opts)
        head = {"id": f"chatcmpl-{random.randrange(999)}", "object": "chat.completion.chunk",
                "created": int(time.time()), "model": model, "system_fingerprint": "fp_ollama"}
        reason = "length" if opts else "stop"
        if body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            def frames() -> Iterator[bytes]:
                count = 0
                for i, tok in enumerate(self.engine.tokens(call, prompt, n)):
                    count += 1
                    delta = {"role": "assistant", "content": tok} if i == 0 else {"content": tok}
                    yield sse_data({**head, "choices": [
                        {"index": 0, "delta": delta, "finish_reason": None}]})
                yield sse_data({**head, "choices": [
                    {"index": 0, "delta": {}, "finish_reason": reason}]})
                if include_usage:
                    yield sse_data({**head, "choices": [],
                                    "usage": usage(timing["prompt_eval_count"], count)})
                yield b"data: [DONE]\n\n"
            return self.engine.stream(call, SSE, frames(), runner)
        toks = self.engine.collect(call, prompt, n, runner)
        return json_reply(call.start_response, 200, {
            **head, "object": "chat.completion",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(toks)},
                         "finish_reason": reason}],
            "usage": usage(timing["prompt_eval_count"], len(toks))})

    def completions(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=True)
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise HTTPError(400, "invalid prompt")
        opts = max_tokens(body)
        runner, timing, n = self.engine.infer(model, prompt, None, opts)
        cid, created = f"cmpl-{random.randrange(999)}", int(time.time())
        reason = "length" if opts else "stop"

        def obj(txt: str, finish: str | None) -> dict[str, Any]:
            return {"id": cid, "object": "text_completion", "created": created, "model": model,
                    "system_fingerprint": "fp_ollama",
                    "choices": [{"text": txt, "index": 0, "finish_reason": finish}]}

        if body.get("stream"):
            def frames() -> Iterator[bytes]:
                toks = list(self.engine.tokens(call, prompt, n)) or [""]
                for i, tok in enumerate(toks):
                    yield sse_data(obj(tok, reason if i == len(toks) - 1 else None))
                yield b"data: [DONE]\n\n"
            return self.engine.stream(call, SSE, frames(), runner)
        toks = self.engine.collect(call, prompt, n, runner)
        reply = obj("".join(toks), reason)
        reply["usage"] = usage(timing["prompt_eval_count"], len(toks))
        return json_reply(call.start_response, 200, reply)

    def embeddings(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=True, style="pull")
        inputs = body.get("input")
        if isinstance(inputs, str):
            inputs = [inputs]
        if not inputs or not isinstance(inputs, list):
            raise HTTPError(400, "invalid input")
        vectors = self.engine.embed_many(model, [str(i) for i in inputs], body)
        tokens = sum(max(1, len(str(i)) // 4) for i in inputs)
        return json_reply(call.start_response, 200, {
            "object": "list", "model": model,
            "data": [{"object": "embedding", "embedding": v, "index": i}
                     for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    def models(self, call: Call) -> Reply:
        data = [{"id": m.name, "object": "model", "created": int(m.modified),
                 "owned_by": names.namespace_of(m.name)} for m in self.sim.installed.values()]
        return json_reply(call.start_response, 200, {"object": "list", "data": data})

    def model(self, call: Call) -> Reply:
        name = call.path[len("/v1/models/"):]
        if not self.sim.has(name):
            return json_reply(call.start_response, 404,
                              openai_error(404, f"model '{name}' not found"))
        created = int(self.sim.installed[names.key(name)].modified)
        return json_reply(call.start_response, 200, {
            "id": name, "object": "model", "created": created,
            "owned_by": names.namespace_of(name)})
