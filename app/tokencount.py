"""Token counts read from a stream as it passes to the client (a whole reply's are read once
by the pipeline's ledger: ``pipeline/tokens.py``).

The last value seen of each count wins: OpenAI's stream reports ``usage`` in the frame before
``[DONE]`` when the client asked for ``stream_options.include_usage``, Ollama's in its final
object. Only pieces that mention a count are searched. A stream that ends without a
completion count (cut short, or an OpenAI stream without usage) is charged one completion
token per frame it delivered: Ollama sends a frame per token. Frames are counted only in a
stream: a whole (non-streamed) reply has none to fall back on.
"""

from __future__ import annotations

from pipeline.tokens import counts_in


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
