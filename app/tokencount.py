"""Token counts read from a reply as it passes to the client.

Ollama reports ``prompt_eval_count``/``eval_count`` in a native reply's final object; OpenAI's
API reports ``usage.prompt_tokens``/``completion_tokens`` (in a stream: the frame before
``[DONE]``, when the client asked for ``stream_options.include_usage``); Anthropic's and the
Responses API report ``input_tokens``/``output_tokens``. The last value seen of each wins.

Only chunks that mention a count are searched, and of a large one only the head and the
tail, where every API puts them, so a long stream or a big embedding costs a substring test
per chunk. A stream that ends without a completion count (cut short, or an OpenAI stream
without usage) is charged one completion token per frame it delivered: Ollama sends a frame
per token.
"""

from __future__ import annotations

import re

_COUNT = re.compile(rb'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|'
                    rb'input_tokens|output_tokens)":\s*(\d+)')
_IN = {b"prompt_eval_count", b"prompt_tokens", b"input_tokens"}
WINDOW = 4096  # bytes searched at each end of a large chunk


class TokenCounter:
    __slots__ = ("frames", "sse", "tokens_in", "tokens_out")

    def __init__(self, content_type: str) -> None:
        self.sse = "event-stream" in content_type
        self.frames = 0
        self.tokens_in: int | None = None
        self.tokens_out: int | None = None

    def observe(self, chunk: bytes) -> None:
        self.frames += chunk.count(b"data:") if self.sse else chunk.count(b"\n")
        if b'_count"' not in chunk and b'_tokens"' not in chunk:
            return
        if len(chunk) > 2 * WINDOW:
            self._search(chunk[:WINDOW])
            self._search(chunk[-WINDOW:])
        else:
            self._search(chunk)

    def _search(self, data: bytes) -> None:
        for m in _COUNT.finditer(data):
            if m.group(1) in _IN:
                self.tokens_in = int(m.group(2))
            else:
                self.tokens_out = int(m.group(2))

    def counts(self, streamed: bool) -> tuple[int, int]:
        """(prompt tokens, completion tokens) of the whole reply."""
        out = self.tokens_out
        if out is None:
            out = max(0, self.frames - 1) if streamed else 0  # the last frame is the end
        return self.tokens_in or 0, out
