"""The token counts a reply reports: prompt (in) and completion (out).

Ollama reports ``prompt_eval_count``/``eval_count`` in a native reply's final object; OpenAI's
API reports ``usage.prompt_tokens``/``completion_tokens``; Anthropic's and the Responses API
report ``input_tokens``/``output_tokens``. Read once per whole reply by the ledger (the
generated-tokens metric, and what a key is charged), and per piece of a stream by the meter
(``app/tokencount.py``). Only where counts can be is searched: one ``findall`` from the first
count on, or of a large chunk only its head and tail, where every API puts them.
"""

from __future__ import annotations

import re

_COUNT = re.compile(rb'"(prompt_eval_count|eval_count|prompt_tokens|completion_tokens|'
                    rb'input_tokens|output_tokens)":\s*(\d+)')
_IN = {b"prompt_eval_count", b"prompt_tokens", b"input_tokens"}
WINDOW = 4096  # bytes searched at each end of a large chunk
NAME_REACH = 16  # from a count's opening quote to its ``_count"``/``_tokens"``: at most 12


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
