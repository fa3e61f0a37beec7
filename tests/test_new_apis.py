"""/v1/responses and /v1/messages through the appliance (issue: the newer Ollama APIs).

Both are routed by model like /v1/chat/completions. A reply through the appliance has the
shape of the node's own; every error the appliance makes itself comes in the API's own shape
(OpenAI's error object on /v1/responses, Anthropic's ``{"type": "error", ...}`` on
/v1/messages) with the node's status and words; a stream cut after its first byte ends with one
error event in the API's own SSE format, and the node slot comes back.
"""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
import requests

from app.errors import anthropic_error, error_body
from pipeline.node import Health
from tests.conftest import assert_no_leaks
from tests.sse import sse_events
from tests.waiting import wait_until

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why blue?"}]
RESPONSE = {"model": "m", "instructions": "be brief", "input": "why blue?"}
MESSAGE = {"model": "m", "max_tokens": 256, "system": "be brief",
           "messages": [{"role": "user", "content": [{"type": "text", "text": "why blue?"}]}]}
BODIES = {"/v1/responses": RESPONSE, "/v1/messages": MESSAGE}
MESSAGE_EVENTS = ["message_start", "content_block_start", "content_block_delta"]


@pytest.fixture
def pool(fake_node, appliance):
    """One simulated node behind the appliance: the same replies both ways."""
    node = fake_node(["m"])
    return appliance([node]), node


def _openai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


def shape(value: Any) -> Any:
    """A JSON value with every scalar replaced by its type name: what two replies share."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value]
    return type(value).__name__


def post(server, path: str, body: Any, **kw: Any) -> requests.Response:
    data = body if isinstance(body, bytes) else json.dumps(body)
    return requests.post(f"{server.url}{path}", data=data, timeout=10, **kw)


# --- /v1/responses ------------------------------------------------------------------------------

def test_responses_through_the_appliance_have_the_nodes_shape_and_text(pool):
    lb, node = pool
    with _openai(lb) as via, _openai(node) as direct:
        a = via.responses.create(**RESPONSE)
        b = direct.responses.create(**RESPONSE)
    assert a.status == b.status == "completed" and a.model == "m"
    assert a.output_text == b.output_text and a.output_text
    assert a.usage.output_tokens == b.usage.output_tokens > 0
    raw_via, raw_direct = post(lb, "/v1/responses", RESPONSE), post(node, "/v1/responses",
                                                                      RESPONSE)
    assert raw_via.headers["Content-Type"] == raw_direct.headers["Content-Type"]
    assert raw_via.headers["Content-Type"].startswith("application/json")  # stream: false
    assert shape(raw_via.json()) == shape(raw_direct.json())


def test_streamed_responses_arrive_as_the_nodes_numbered_events(pool):
    lb, node = pool
    with _openai(lb) as via, _openai(node) as direct:
        a = list(via.responses.create(model="m", input=CHAT, stream=True))
        b = list(direct.responses.create(model="m", input=CHAT, stream=True))
    assert [e.type for e in a] == [e.type for e in b]
    assert a[0].type == "response.created" and a[-1].type == "response.completed"
    assert [e.sequence_number for e in a] == list(range(len(a)))
    text = "".join(e.delta for e in a if e.type == "response.output_text.delta")
    assert text and text == a[-1].response.output_text
    assert text == "".join(e.delta for e in b if e.type == "response.output_text.delta")
    with post(lb, "/v1/responses", {**RESPONSE, "stream": True}, stream=True) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = sse_events(r)
    assert all(name == data["type"] for name, data in events)  # named events, as Ollama's


# --- /v1/messages -------------------------------------------------------------------------------

def test_messages_through_the_appliance_have_the_nodes_shape_and_text(pool):
    lb, node = pool
    a, b = post(lb, "/v1/messages", MESSAGE), post(node, "/v1/messages", MESSAGE)
    assert a.status_code == b.status_code == 200
    assert a.headers["Content-Type"].startswith("application/json")  # stream: false
    assert shape(a.json()) == shape(b.json())
    assert a.json()["content"] == b.json()["content"] and a.json()["content"][0]["text"]
    assert a.json()["stop_reason"] == "end_turn" and a.json()["model"] == "m"


def test_streamed_messages_arrive_as_the_nodes_sse_events(pool):
    lb, node = pool
    body = {**MESSAGE, "stream": True}
    with post(lb, "/v1/messages", body, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
        via = sse_events(r)
    with post(node, "/v1/messages", body, stream=True) as r:
        direct = sse_events(r)
    names = [name for name, _ in via]
    assert names == [name for name, _ in direct]
    assert names[:3] == MESSAGE_EVENTS and names[-2:] == ["message_delta", "message_stop"]
    assert all(name == data["type"] for name, data in via)
    assert [shape(d) for _, d in via] == [shape(d) for _, d in direct]
    text = "".join(d["delta"]["text"] for n, d in via if n == "content_block_delta")
    assert text and text == post(lb, "/v1/messages", MESSAGE).json()["content"][0]["text"]


# --- errors before the first byte: each API's shape, the node's status and words --------------

def _without_request_id(body: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != "request_id"}


def _check_shape(path: str, body: dict[str, Any], status: int) -> str:
    """Asserts the API's error shape; returns the message."""
    if path == "/v1/messages":
        assert body["type"] == "error" and set(body["error"]) == {"type", "message"}
        kind = {400: "invalid_request_error", 404: "not_found_error",
                503: "overloaded_error"}[status]
        assert body["error"]["type"] == kind
        return body["error"]["message"]
    assert set(body) == {"error"} and body["error"]["param"] is None
    kind = {400: "invalid_request_error", 404: "not_found_error", 503: "api_error"}[status]
    assert body["error"]["type"] == kind and body["error"]["code"] is None
    return body["error"]["message"]


CASES = {
    "unknown model": (lambda b: {**b, "model": "nope"}, 404, "model 'nope' not found"),
    "unknown model, streamed": (lambda b: {**b, "model": "nope", "stream": True}, 404,
                                "model 'nope' not found"),
    "missing model": (lambda b: {k: v for k, v in b.items() if k != "model"}, 400,
                      "model is required"),
    "empty body": (lambda b: b"", 400, "missing request body"),
}


@pytest.mark.parametrize("path", sorted(BODIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_errors_the_appliance_makes_are_the_nodes_in_the_apis_shape(pool, path, case):
    lb, node = pool
    make, status, message = CASES[case]
    body = make(BODIES[path])
    before = node.stats.by_path.get(path, 0)
    via = post(lb, path, body)
    assert node.stats.by_path.get(path, 0) == before  # answered by the appliance itself
    direct = post(node, path, body)
    assert via.status_code == direct.status_code == status
    assert via.headers["Content-Type"].startswith("application/json")
    assert _check_shape(path, via.json(), status) == message
    assert _without_request_id(via.json()) == _without_request_id(direct.json())


@pytest.mark.parametrize(("path", "struct"), [("/v1/responses", "openai.ResponsesRequest"),
                                              ("/v1/messages", "anthropic.MessagesRequest")])
def test_bad_json_is_400_in_the_apis_shape_and_not_forwarded(pool, path, struct):
    lb, node = pool
    before = node.stats.by_path.get(path, 0)
    r = post(lb, path, b"{nope")
    assert r.status_code == 400
    assert _check_shape(path, r.json(), 400) == (
        "invalid character 'n' looking for beginning of value")
    r = post(lb, path, b"[1]")
    assert r.status_code == 400
    assert _check_shape(path, r.json(), 400) == (
        f"json: cannot unmarshal array into Go value of type {struct}")
    r = post(lb, path, {**BODIES[path], "stream": "yes"})
    assert r.status_code == 400
    assert _check_shape(path, r.json(), 400) == (
        f"json: cannot unmarshal string into Go struct field {struct.split('.')[1]}.stream "
        f"of type bool")
    assert node.stats.by_path.get(path, 0) == before  # nothing forwarded


def test_openai_client_errors_on_responses_are_the_nodes(pool):
    lb, node = pool
    bodies = []
    for server in (lb, node):
        with _openai(server) as client, pytest.raises(openai.NotFoundError) as err:
            client.responses.create(model="nope", input="x")
        bodies.append(err.value.body)
    assert bodies[0] == bodies[1] == {"message": "model 'nope' not found",
                                      "type": "not_found_error", "param": None, "code": None}


def test_error_types_follow_each_apis_table():
    body = anthropic_error(503, "busy", "abc123")
    assert body == {"type": "error", "error": {"type": "overloaded_error", "message": "busy"},
                    "request_id": "abc123"}
    assert error_body(413, "too big", "/v1/messages")["error"]["type"] == "request_too_large"
    assert error_body(504, "late", "/v1/messages")["error"]["type"] == "api_error"
    assert error_body(404, "x", "/v1/inference")["error"]["type"] == "not_found_error"  # OpenAI's
    assert error_body(404, "x", "/api/generate") == {"error": "x"}


def test_all_nodes_down_is_503_with_retry_after_in_each_apis_shape(fake_node, appliance):
    node = fake_node(["m"])
    lb = appliance([node], healthCheck={"intervalMs": 50, "downThreshold": 2})
    node.refuse()  # the box dies
    n0 = lb.factory.node_registry.get("n0")
    assert wait_until(lambda: n0.health is Health.DOWN, 10)
    for path, body in BODIES.items():
        r = post(lb, path, {**body, "stream": True})
        assert r.status_code == 503 and int(r.headers["Retry-After"]) >= 1
        assert "all are down or disabled" in _check_shape(path, r.json(), 503)
    with _openai(lb) as client, pytest.raises(openai.APIStatusError) as err:
        client.responses.create(**RESPONSE)
    assert err.value.status_code == 503 and err.value.response.headers["Retry-After"]


# --- a stream cut after its first byte: one error event in the API's format ----------------------

def test_messages_stream_reset_mid_way_ends_with_one_anthropic_error_event(fake_node, appliance):
    node = fake_node(["m"], fault="reset-mid-stream", decode_tps=50)
    lb = appliance([node])
    with post(lb, "/v1/messages", {**MESSAGE, "stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "text/event-stream"
        events = sse_events(r)
    names = [name for name, _ in events]
    assert names == [*MESSAGE_EVENTS, "content_block_delta", "error"]  # two tokens, the cut
    data = events[-1][1]
    assert set(data) == {"type", "error"} and data["type"] == "error"
    assert data["error"]["type"] == "api_error"
    assert "during the stream" in data["error"]["message"]
    assert node.stats.by_path["/v1/messages"] == 1  # not retried after the first byte
    assert wait_until(lambda: node.stats.active == 0 and node.stats.streams_open == 0)
    assert_no_leaks(lb)  # the node slot and the upstream connection came back


def test_responses_stream_reset_mid_way_ends_with_one_error_event(fake_node, appliance):
    node = fake_node(["m"], fault="reset-mid-stream", decode_tps=50)
    lb = appliance([node])
    seen = []
    with _openai(lb) as client, pytest.raises(openai.APIError) as err:
        for event in client.responses.create(model="m", input=CHAT, stream=True):
            seen.append(event.type)
    assert "during the stream" in err.value.message  # the SDK raises, no silent truncation
    assert seen[0] == "response.created" and "response.completed" not in seen
    assert seen.count("response.output_text.delta") == 2
    with post(lb, "/v1/responses", {**RESPONSE, "stream": True}, stream=True) as r:
        events = sse_events(r)
    assert [name for name, _ in events].count("error") == 1 and events[-1][0] == "error"
    data = events[-1][1]
    assert (data["type"], data["code"], data["param"]) == ("error", "api_error", None)
    assert data["message"] == data["error"]["message"] and "during the stream" in data["message"]
    previous = events[-2][1]["sequence_number"]
    assert data.get("sequence_number", previous + 1) == previous + 1
    assert node.stats.by_path["/v1/responses"] == 2  # neither was retried
    assert wait_until(lambda: node.stats.active == 0 and node.stats.streams_open == 0)
    assert_no_leaks(lb)
