"""Token counts are read from every API's reply shape, whole or streamed, wherever in the reply
the counts sit (before them may come a long ``context`` array or the reply's text)."""

from __future__ import annotations

import json

import pytest

from app.tokencount import TokenCounter
from pipeline.tokens import counts_in


def whole(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


OLLAMA = whole({"model": "m", "response": "eval_count", "done": True, "context": list(range(300)),
                "total_duration": 5, "prompt_eval_count": 11, "prompt_eval_duration": 3,
                "eval_count": 7, "eval_duration": 4})
OPENAI = whole({"id": "c", "choices": [{"message": {"content": "x" * 3000}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 8, "total_tokens": 20}})
ANTHROPIC = whole({"id": "m", "content": [{"type": "text", "text": "hi"}],
                   "usage": {"input_tokens": 13, "output_tokens": 9}})


EMBED = b'{"embeddings":[[0.1]]}'


@pytest.mark.parametrize(("body", "want"), [(OLLAMA, (11, 7)), (OPENAI, (12, 8)),
                                            (ANTHROPIC, (13, 9)), (EMBED, (0, 0))])
def test_a_whole_reply_is_counted_from_its_counts(body, want):
    counter = TokenCounter("application/json")
    counter.observe(body)
    assert counter.counts() == want
    got = counts_in(body)  # the ledger's one call for a complete reply
    assert (got[0] or 0, got[1] or 0) == want


def test_a_large_whole_reply_is_counted_in_one_call_from_its_ends():
    body = OLLAMA[:-1] + b',"pad":"' + b"x" * 20_000 + b'"}'
    assert counts_in(body) == (11, 7)


def test_a_large_reply_is_counted_from_its_ends():
    body = OLLAMA[:-1] + b',"pad":"' + b"x" * 20_000 + b'"}'
    counter = TokenCounter("application/json")
    counter.observe(body[:9000])
    counter.observe(body[9000:])
    assert counter.counts() == (11, 7)


def test_a_stream_is_counted_from_its_last_counts_else_by_its_frames():
    counter = TokenCounter("application/x-ndjson")
    for i in range(5):
        counter.observe(b'{"response":"t%d","done":false}\n' % i)
    assert counter.counts() == (0, 4)  # cut short: one token per frame but the last
    counter.observe(b'{"done":true,"prompt_eval_count":3,"eval_count":6}\n')
    assert counter.counts() == (3, 6)
    sse = TokenCounter("text/event-stream")
    sse.observe(b'data: {"type":"message_start","message":{"usage":{"input_tokens":4}}}\n\n'
                b'data: {"type":"message_delta","usage":{"output_tokens":2}}\n\n')
    assert sse.counts() == (4, 2)
