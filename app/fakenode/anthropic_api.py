"""Anthropic's Messages API, ``POST /v1/messages``, as newer Ollama servers serve it.

Translated around chat: ``system`` becomes a system message, ``messages`` the conversation
(string content or text blocks), ``max_tokens`` (required) the token limit. A reply is a
``message`` object with text content blocks, ``stop_reason`` ``end_turn`` or ``max_tokens``
and ``usage``. ``"stream": true`` sends named SSE events: ``message_start``, then per content
block ``content_block_start``, ``content_block_delta`` (one per token), ``content_block_stop``,
then ``message_delta`` (the stop reason and usage) and ``message_stop``. Errors take
Anthropic's shape, ``{"type": "error", "error": {"type": ..., "message": ...}}``.
"""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Iterator
from typing import Any

from app.fakenode.engine import Engine
from app.fakenode.router import Route, Router
from app.fakenode.wire import (
    SSE,
    Call,
    HTTPError,
    Reply,
    anthropic_error,
    json_reply,
    sse_event,
)

_TYPE_ERROR = "json: cannot unmarshal {got} into Go struct field MessagesRequest.{field} of " \
              "type {want}"
_GO_TYPES = {str: "string", int: "number", float: "number", bool: "bool", list: "array",
             dict: "object"}


def _check_type(body: dict[str, Any], field: str, want: type, go_name: str) -> None:
    value = body.get(field)
    if value is None:
        return
    if not isinstance(value, want) or (want is int and isinstance(value, bool)):
        got = _GO_TYPES.get(type(value), "value")
        raise HTTPError(400, _TYPE_ERROR.format(got=got, field=field, want=go_name))


def _block_text(block: Any) -> str:
    """One content block's text; images must carry base64 data, as Ollama requires."""
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return str(block.get("text") or "")
    if kind == "image":
        source = block.get("source")
        if not isinstance(source, dict):
            raise HTTPError(400, "invalid image source")
        if source.get("type") != "base64":
            raise HTTPError(400, f"invalid image source type: {source.get('type')}. Only "
                                 "base64 images are supported.")
        try:
            base64.b64decode(str(source.get("data") or ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise HTTPError(400, f"invalid base64 image data: {exc}") from None
        return ""
    if kind == "tool_use" and not block.get("id"):
        raise HTTPError(400, "tool_use block missing required 'id' field")
    if kind == "tool_result":
        content = block.get("content")
        return content if isinstance(content, str) else ""
    return ""


def _content(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(_block_text(b) for b in content)
    return ""


def conversation(body: dict[str, Any]) -> tuple[list[str], int]:
    """The chat texts (system first) and Ollama's input-token estimate for message_start."""
    _check_type(body, "model", str, "string")
    _check_type(body, "max_tokens", int, "int")
    _check_type(body, "messages", list, "[]anthropic.MessageParam")
    _check_type(body, "stream", bool, "bool")
    if not body.get("model"):
        raise HTTPError(400, "model is required")
    if (body.get("max_tokens") or 0) <= 0:
        raise HTTPError(400, "max_tokens is required and must be positive")
    if not body.get("messages"):
        raise HTTPError(400, "messages is required")
    system = body.get("system")
    texts = [_content(system)] if system else []
    chars = len(texts[0]) if texts else 0
    for msg in body["messages"]:
        if not isinstance(msg, dict):
            raise HTTPError(400, "json: cannot unmarshal into Go value of type "
                                 "anthropic.MessageParam")
        role = str(msg.get("role") or "").lower()
        text = _content(msg.get("content"))
        chars += len(role) + len(text)
        if text:
            texts.append(text)
    return texts, max(1, chars // 4)


class MessagesAPI:
    """``POST /v1/messages``, streamed or not, on the shared inference path."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def register(self, router: Router) -> None:
        router.add("POST", "/v1/messages", Route(self.create, shape=anthropic_error,
                                                 busy_shape=anthropic_error, inference=True))

    def create(self, call: Call) -> Reply:
        body = call.body
        texts, estimate = conversation(body)
        model = self.engine.model(body, missing_404=False)
        n, truncated = self.engine.reply_length(body["max_tokens"])
        prompt = "\n".join(texts)
        runner, timing, n = self.engine.infer(model, prompt, None, {"num_predict": n})
        msg_id = "msg_" + secrets.token_hex(12)
        stop = "max_tokens" if truncated else "end_turn"
        if body.get("stream") is True:
            events = Events(msg_id, model, estimate)
            frames = events.frames(self.engine.tokens(call, prompt, n),
                                   timing["prompt_eval_count"], stop)
            return self.engine.stream(call, SSE, frames, runner, error_frame=lambda _: b"",
                                      headers=[("Cache-Control", "no-cache")])
        toks = self.engine.collect(call, prompt, n, runner)
        content = [{"type": "text", "text": "".join(toks)}] if toks else []
        return json_reply(call.start_response, 200, {
            "id": msg_id, "type": "message", "role": "assistant", "model": model,
            "content": content, "stop_reason": stop,
            "usage": {"input_tokens": timing["prompt_eval_count"], "output_tokens": len(toks)}})


class Events:
    """The Messages stream for one reply: one text block between start and stop events."""

    def __init__(self, msg_id: str, model: str, input_estimate: int) -> None:
        self.msg_id, self.model, self.input_estimate = msg_id, model, input_estimate

    def frames(self, tokens: Iterator[str], prompt_tokens: int, stop: str) -> Iterator[bytes]:
        count = 0
        for tok in tokens:
            if not count:  # the first events go out with the first token, as Ollama's do
                yield self.message_start()
                yield sse_event("content_block_start", {
                    "type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}})
            count += 1
            yield sse_event("content_block_delta", {
                "type": "content_block_delta", "index": 0,
                "delta": {"type": "text_delta", "text": tok}})
        if count:
            yield sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
        else:
            yield self.message_start()
        yield sse_event("message_delta", {
            "type": "message_delta", "delta": {"stop_reason": stop},
            "usage": {"input_tokens": prompt_tokens, "output_tokens": count}})
        yield sse_event("message_stop", {"type": "message_stop"})

    def message_start(self) -> bytes:
        """Usage here is Ollama's estimate: the real counts come only with the last chunk."""
        return sse_event("message_start", {"type": "message_start", "message": {
            "id": self.msg_id, "type": "message", "role": "assistant", "model": self.model,
            "content": [], "usage": {"input_tokens": self.input_estimate, "output_tokens": 0}}})
