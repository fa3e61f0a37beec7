"""Validation: request bodies (the fast path and the schema agree) and the config file.

The config's schemas are derived from its dataclasses, so the tests here pin what a file
means: defaults, restart-only keys, error lines, and that the README's table says the same.
"""

from __future__ import annotations

import itertools
import json
import re
from dataclasses import MISSING, replace
from pathlib import Path

import pytest

from pipeline.config import (
    RESTART_KEYS,
    Config,
    ConfigError,
    parse_config,
    restart_required,
    settings,
    with_restart_keys_from,
)
from pipeline.endpoints import ENDPOINTS
from pipeline.validation import (
    BadRequest,
    _plain_loads,
    is_unload,
    load_facts,
    prompt_length,
    read_facts,
)

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


# --- the config file --------------------------------------------------------------------------

README = Path(__file__).resolve().parent.parent / "README.md"
ROW = re.compile(r"^\| `([A-Za-z\[\].]+)`(?: \*new\*)? \| ([^|]+) \| (.*) \|$")


def readme_table() -> dict[str, tuple[str, bool]]:
    """The README's configuration table: key -> (default as written, marked *(restart)*)."""
    section = README.read_text(encoding="utf-8").split("## Configuration", 1)[1]
    section = section.split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        if m := ROW.match(line):
            rows[m[1]] = (m[2].strip().strip("`"), "*(restart)*" in m[3])
    return rows


def documented(default, written: str) -> bool:
    """Whether the README's default column says what the dataclass default is."""
    if default is MISSING:
        return written == "required"
    if default is None:
        return written in ("none", "(global)")
    if isinstance(default, bool):
        return written == str(default).lower()
    if isinstance(default, tuple):
        return written == repr(list(default))
    if isinstance(default, int | float):
        return float(written) == default
    return written == default


def test_readme_configuration_table_matches_the_dataclasses():
    table = readme_table()
    declared = dict(settings())
    assert sorted(table) == sorted(declared), "README table and config dataclasses differ"
    for key, fl in declared.items():
        written, restart = table[key]
        assert documented(fl.default, written), f"{key}: README says {written!r}"
        assert restart == bool(fl.metadata.get("restart")), f"{key}: *(restart)* mark"


def test_restart_only_keys_are_the_flagged_fields_and_keep_their_running_values():
    assert [f"{s}.{k}" for s, k in RESTART_KEYS] == [
        "server.port", "server.host", "server.backlog", "disruptor.ringBufferSize",
        "disruptor.waitStrategy", "security.usageFile"]
    old = parse_config({})
    new = parse_config({"server": {"host": "10.0.0.1", "backlog": 5, "drainSeconds": 3},
                        "disruptor": {"waitStrategy": "blocking", "queueSize": 3}})
    assert restart_required(old, new) == ["server.host", "server.backlog",
                                          "disruptor.waitStrategy"]
    kept = with_restart_keys_from(old, new)
    assert kept.server == replace(old.server, drainSeconds=3.0)
    assert kept.disruptor == replace(old.disruptor, queueSize=3)
    assert restart_required(old, kept) == []


def test_absent_and_empty_sections_take_the_dataclass_defaults():
    assert parse_config({}) == Config()
    assert parse_config(None) == Config()
    assert parse_config({"server": None, "nodes": None, "retry": {}}) == Config()
    cfg = parse_config({"server": {"port": 11434},
                        "nodes": [{"id": "a", "url": "http://h:1/"}]})
    assert cfg.server == replace(Config().server, port=11434)
    assert cfg.nodes[0].url == "http://h:1" and cfg.nodes[0].maxConcurrentRequests == 4


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        parse_config(data)
    return err.value.problems


def test_every_problem_is_listed_by_key_path_and_unknown_keys_are_rejected():
    assert problems({"server": {"port": 99999, "bogus": 1},
                     "nodes": [{"id": "a", "url": "ftp://x", "colour": "red"}, {"id": ""}],
                     "disruptor": {"ringBufferSize": 1000}, "retry": {"backoffMultiplier": 0.5},
                     "metrics": {"prefix": "9x"}, "bogus": None}) == [
        "nodes.0.url: must be an http:// or https:// URL with a host, got 'ftp://x'",
        "nodes.0.colour: Unknown field.",
        "nodes.1.id: Shorter than minimum length 1.",
        "nodes.1.url: Missing data for required field.",
        "server.port: Must be greater than or equal to 0 and less than or equal to 65535.",
        "server.bogus: Unknown field.",
        "disruptor.ringBufferSize: must be a power of two (1024, 2048, ...), got 1000",
        "retry.backoffMultiplier: Must be greater than or equal to 1.0.",
        "metrics.prefix: must be a metric name",
        "bogus: Unknown field.",
    ]
    assert problems([1]) == ["(top): the config must be a YAML mapping"]
    assert problems({"nodes": [{"id": "a", "url": "http://h:1"}] * 2}) == [
        "nodes: duplicate node id(s): a"]
    assert problems({"server": {"port": None}, "timeouts": {"connectTimeoutMs": 0}}) == [
        "server.port: Field may not be null.",
        "timeouts.connectTimeoutMs: Must be greater than or equal to 1."]


@pytest.mark.parametrize("body", [
    b'{"model": "m"}', b'{"model": "m"} ', b'{"model": "m"} x', b'{"model": ', b'{\xff}',
    '{"model": "\u00e9"}'.encode(), '{"model": "m"}'.encode("utf-16-le"), b"{}", b"{",
    b'{"a": "\xed\xa0\x80"}',  # a lone surrogate, which json.loads lets through
])
def test_the_plain_decoder_answers_as_json_loads(body: bytes) -> None:
    def outcome(loads):
        try:
            return loads(body)
        except ValueError as exc:
            return type(exc), str(exc)

    assert outcome(_plain_loads) == outcome(json.loads)
