"""Request validation: the fast path and the marshmallow schema agree on every body."""

from __future__ import annotations

import itertools

import pytest

from pipeline.endpoints import ENDPOINTS
from pipeline.validation import BadRequest, is_unload, load_facts, prompt_length, read_facts

VALUES = [None, "llama3.2", "", 3, 2.5, True, False, [], {}, ["x"]]
EP = ENDPOINTS["/api/chat"]


def outcome(fn, payload):
    try:
        return ("ok", fn(EP, payload))
    except BadRequest as exc:
        return ("error", str(exc))


@pytest.mark.parametrize("model,stream", list(itertools.product(VALUES, VALUES)))
def test_fast_path_and_schema_agree(model, stream):
    for payload in ({"model": model, "stream": stream}, {"name": model, "stream": stream},
                    {"model": model}, {"stream": stream}, {}):
        assert outcome(read_facts, payload) == outcome(load_facts, payload), payload


def test_schema_errors_are_worded_like_go():
    with pytest.raises(BadRequest, match=r"cannot unmarshal number into Go struct field "
                                         r"ChatRequest\.model of type string"):
        read_facts(EP, {"model": 5})
    with pytest.raises(BadRequest, match=r"ChatRequest\.stream of type bool"):
        read_facts(EP, {"model": "m", "stream": 1})


def test_unload_detection_and_prompt_length():
    assert is_unload({"model": "m", "keep_alive": 0})
    assert is_unload({"model": "m", "keep_alive": "0s", "messages": []})
    assert not is_unload({"model": "m", "keep_alive": 0, "prompt": "hi"})
    assert not is_unload({"model": "m", "keep_alive": False})
    assert not is_unload({"model": "m"})
    assert prompt_length({"prompt": "abc", "system": "de"}) == 5
    assert prompt_length({"messages": [{"role": "user", "content": "abcd"},
                                       {"content": [{"type": "text", "text": "xy"}]}]}) == 6
    assert prompt_length({"input": ["a", "bb"]}) == 3
