"""Token counts read from a reply as it passes to the client.

Ollama reports ``prompt_eval_count``/``eval_count`` in a native reply's final object; OpenAI's
API reports ``usage.prompt_tokens``/``completion_tokens`` (in a stream: the frame before
``[DONE]``, when the client asked for ``stream_options.include_usage``); Anthropic's and the
Responses API report ``input_tokens``/``output_tokens``. The last value seen of each wins.

Only chunks that mention a count are searched, and of a large one only the head and the
tail, where every API puts them, so a long stream or a big embedding costs a substring test
per chunk; one ``findall`` reads every count of a chunk. A stream that ends without a
completion count (cut short, or an OpenAI stream without usage) is charged one completion
token per frame it delivered: Ollama sends a frame per token. Frames are counted only in a
stream: a whole (non-streamed) reply has none to fall back on.
"""

from __future__ import annotations

import re

_COUNT = re.compile(rb'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|'
                    rb'input_tokens|output_tokens)":\s*(\d+)')
_IN = {b"prompt_eval_count", b"prompt_tokens", b"input_tokens"}
WINDOW = 4096  # bytes searched at each end of a large chunk
NAME_REACH = 16  # from a count's opening quote to its ``_count"``/``_tokens"``: at most 12


def is_stream(content_type: str) -> bool:
    """A stream (NDJSON or SSE): counted by frames, and cut at its next piece when revoked."""
    return "ndjson" in content_type or "event-stream" in content_type


class TokenCounter:
    __slots__ = ("frame", "frames", "streamed", "tokens_in", "tokens_out")

    def __init__(self, content_type: str) -> None:
        sse = "event-stream" in content_type
        self.streamed = is_stream(content_type)
        #: what starts (SSE) or ends (NDJSON) a frame; None: not a stream
        self.frame = b"data:" if sse else (b"\n" if self.streamed else None)
        self.frames = 0
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None

    def observe(self, chunk: bytes) -> None:
        if self.frame is not None:
            self.frames += chunk.count(self.frame)
        tokens_in, tokens_out = counts_in(chunk)
        if tokens_in is not None:
            self.tokens_in = tokens_in
        if tokens_out is not None:
            self.tokens_out = tokens_out

    def counts(self, streamed: bool | None = None) -> tuple[int, int]:
        """(prompt tokens, completion tokens) of the whole reply. ``streamed``: whether the
        reply was a stream, if not the counter's own reading of its type."""
        out = self.tokens_out
        if out is None:
            stream = self.streamed if streamed is None else streamed
            out = max(0, self.frames - 1) if stream else 0  # the last frame is the end
        return self.tokens_in or 0, out


def counts_in(chunk: bytes) -> tuple[int | None, int | None]:
    """The last (prompt, completion) counts a chunk holds, None for one it lacks; searched only
    where counts can be. For a whole (non-streamed) reply these are its counts, in one call."""
    count_at, tokens_at = chunk.find(b'_count"'), chunk.find(b'_tokens"')
    if count_at < 0 and tokens_at < 0:
        return None, None
    if len(chunk) <= 2 * WINDOW:  # searched from the first count on, where they all are
        first = count_at if tokens_at < 0 or 0 <= count_at < tokens_at else tokens_at
        found = _COUNT.findall(chunk, max(0, first - NAME_REACH))
    else:
        found = _COUNT.findall(chunk[:WINDOW]) + _COUNT.findall(chunk[-WINDOW:])
    tokens_in = tokens_out = None
    for name, value in found:
        if name in _IN:
            tokens_in = int(value)
        else:
            tokens_out = int(value)
    return tokens_in, tokens_out
