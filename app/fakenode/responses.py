"""The OpenAI Responses API, ``POST /v1/responses``, as Ollama serves it (v0.13.3 and later).

Stateless only, translated around chat like the other /v1 routes: ``instructions`` becomes a
system message, ``input`` (a string, or message / function-call items) the conversation,
``max_output_tokens`` the token limit. ``stream`` defaults to false; a stream is named SSE
events (``event: response.output_text.delta`` ...) whose data carry ``type`` and a
``sequence_number``, from ``response.created`` to ``response.completed``. Errors take
OpenAI's shape. The events are sent as the tokens are made: the first ones arrive after the
load and the prefill, as Ollama's do.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from typing import Any

from app.fakenode.engine import Engine
from app.fakenode.router import Route, Router
from app.fakenode.wire import SSE, Call, HTTPError, Reply, json_reply, openai_error, sse_event

EFFORTS = ("none", "low", "medium", "high", "max")
CONTENT_TYPES = ("input_text", "output_text", "input_image", "input_file")


def _content_text(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a content list (checked by type)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise HTTPError(400, f"{where}: content must be a string or array")
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in CONTENT_TYPES:
            raise HTTPError(400, f"{where}: content[{j}]: unknown content type: {kind or ''}")
        if kind == "input_file":
            raise HTTPError(400, "file inputs are not currently supported")
        if kind in ("input_text", "output_text"):
            out.append(str(part.get("text") or ""))
    return "".join(out)


def _item_text(item: Any, i: int) -> str:
    """One input item's share of the conversation text."""
    if not isinstance(item, dict):
        raise HTTPError(400, f"input[{i}]: input item missing required 'type' field")
    kind = item.get("type") or ("message" if item.get("role") else "")
    if kind == "message":
        return _content_text(item.get("content"), f"input[{i}]")
    if kind == "function_call":
        return f"{item.get('name', '')}({item.get('arguments', '')})"
    if kind == "function_call_output":
        output = item.get("output")
        return output if isinstance(output, str) else _content_text(output, f"input[{i}]")
    if kind == "reasoning":
        return ""
    if not kind:
        raise HTTPError(400, f"input[{i}]: input item missing required 'type' field")
    raise HTTPError(400, f'input[{i}]: unknown input item type: "{kind}"')


def conversation(body: dict[str, Any]) -> list[str]:
    """The chat messages' texts the request turns into, validated as Ollama validates them."""
    instructions = body.get("instructions")
    texts = [instructions] if isinstance(instructions, str) and instructions else []
    source = body.get("input")
    if isinstance(source, str):
        texts += [source] if source else []
    elif isinstance(source, list):
        texts += [t for i, item in enumerate(source) if (t := _item_text(item, i))]
    elif source is not None:
        raise HTTPError(400, "input must be a string or array")
    reasoning = body.get("reasoning")
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else None
    if effort and effort not in EFFORTS:
        raise HTTPError(400, f'invalid reasoning value: "{effort}" (must be "high", "medium", '
                             f'"low", "max", or "none")')
    return texts


def response_object(body: dict[str, Any], rid: str, status: str, output: list[Any],
                    usage: dict[str, Any] | None) -> dict[str, Any]:
    """The response resource, echoing the request's settings the way Ollama fills them in."""
    reasoning = body.get("reasoning") if isinstance(body.get("reasoning"), dict) else {}
    text_cfg = body.get("text") if isinstance(body.get("text"), dict) else {}
    return {
        "id": rid, "object": "response", "created_at": int(time.time()), "completed_at": None,
        "status": status, "incomplete_details": None, "model": body.get("model"),
        "previous_response_id": None, "instructions": body.get("instructions") or None,
        "output": output, "error": None, "tools": body.get("tools") or [],
        "tool_choice": "auto", "truncation": body.get("truncation") or "disabled",
        "parallel_tool_calls": True,
        "text": {"format": text_cfg.get("format") or {"type": "text"}},
        "top_p": body["top_p"] if body.get("top_p") is not None else 1.0,
        "presence_penalty": 0, "frequency_penalty": 0, "top_logprobs": 0,
        "temperature": body["temperature"] if body.get("temperature") is not None else 1.0,
        "reasoning": ({"effort": reasoning.get("effort"), "summary": reasoning.get("summary")}
                      if reasoning.get("effort") or reasoning.get("summary") else None),
        "usage": usage, "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": None, "store": False, "background": bool(body.get("background")),
        "service_tier": "default", "metadata": {}, "safety_identifier": None,
        "prompt_cache_key": None}


def message_item(item_id: str, text: str, status: str = "completed") -> dict[str, Any]:
    content = [output_text(text)] if status == "completed" else []
    return {"id": item_id, "type": "message", "status": status, "role": "assistant",
            "content": content}


def output_text(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def usage_of(prompt: int, output: int) -> dict[str, Any]:
    return {"input_tokens": prompt, "output_tokens": output, "total_tokens": prompt + output,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0}}


class ResponsesAPI:
    """``POST /v1/responses``, streamed or not, on the shared inference path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/responses", Route(self.create, shape=openai_error,
                                                  busy_shape=openai_error, inference=True))

    def create(self, call: Call) -> Reply:
        body = call.body
        model = self.engine.model(body, missing_404=False)
        texts = conversation(body)
        rid, item_id = f"resp_{random.randrange(999999)}", f"msg_{random.randrange(999999)}"
        n, _ = self.engine.reply_length(body.get("max_output_tokens"))
        prompt = "\n".join(texts)
        runner, prompt_tokens = None, 0
        if texts:
            runner, timing, n = self.engine.infer(model, prompt, None, {"num_predict": n})
            prompt_tokens = timing["prompt_eval_count"]
        else:  # nothing to say: Ollama's chat only loads the model
            self.engine.sim.ensure_loaded(model, None)
        if body.get("stream") is True:
            tokens = self.engine.tokens(call, prompt, n) if runner else iter(())
            frames = Events(body, rid, item_id).frames(tokens, prompt_tokens)
            if runner is None:
                call.start_response("200 OK", [("Content-Type", SSE)])
                return frames
            return self.engine.stream(call, SSE, frames, runner, error_frame=lambda _: b"")
        toks = self.engine.collect(call, prompt, n, runner) if runner else []
        reply = response_object(body, rid, "completed", [message_item(item_id, "".join(toks))],
                                usage_of(prompt_tokens, len(toks)))
        reply["completed_at"] = int(time.time())
        return json_reply(call.start_response, 200, reply)


class Events:
    """The Responses stream for one reply: numbered events around the text deltas."""

    def __init__(self, body: dict[str, Any], rid: str, item_id: str) -> None:
        self.body, self.rid, self.item_id = body, rid, item_id
        self.seq = 0

    def event(self, kind: str, **data: Any) -> bytes:
        frame = sse_event(kind, {"type": kind, "sequence_number": self.seq, **data})
        self.seq += 1
        return frame

    def frames(self, tokens: Iterator[str], prompt_tokens: int) -> Iterator[bytes]:
        where = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        text, count = "", 0
        for tok in tokens:
            if not count:  # the first events go out with the first token, as Ollama's do
                yield from self.opening()
                yield self.event("response.output_item.added", output_index=0,
                                 item=message_item(self.item_id, "", "in_progress"))
                yield self.event("response.content_part.added", **where, part=output_text(""))
            text, count = text + tok, count + 1
            yield self.event("response.output_text.delta", **where, delta=tok, logprobs=[])
        output: list[dict[str, Any]] = []
        if count:
            yield self.event("response.output_text.done", **where, text=text, logprobs=[])
            yield self.event("response.content_part.done", **where, part=output_text(text))
            output = [message_item(self.item_id, text)]
            yield self.event("response.output_item.done", output_index=0, item=output[0])
        else:
            yield from self.opening()
        done = response_object(self.body, self.rid, "completed", output,
                               usage_of(prompt_tokens, count))
        done["completed_at"] = int(time.time())
        yield self.event("response.completed", response=done)

    def opening(self) -> Iterator[bytes]:
        for kind in ("response.created", "response.in_progress"):
            yield self.event(kind, response=response_object(self.body, self.rid, "in_progress",
                                                            [], None))
