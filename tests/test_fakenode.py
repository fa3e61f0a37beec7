"""The simulated Ollama node on its own: no appliance in between, real sockets, real clients.

The node is the judge of what Ollama would see in every other test, so it must stand apart
from the appliance (no shared code) and follow the reference's shapes itself.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import gevent
import openai
import pytest
import requests

from app.fakenode import names

FAKENODE = Path(__file__).resolve().parent.parent / "app" / "fakenode"


def _imported_modules(source: str, package: str) -> list[str]:
    """What a module of ``package`` imports: ``from X import y`` counts as ``X.y``, and
    relative imports are resolved against the package."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            out += [f"{base}.{alias.name}" for alias in node.names]
    return out


def test_the_simulator_shares_no_code_with_the_appliance():
    sources = sorted(FAKENODE.rglob("*.py"))
    assert len(sources) > 5  # the walk really found the package
    offenders = []
    for path in sources:
        package = ".".join(path.relative_to(FAKENODE.parent.parent).parent.parts)
        for module in _imported_modules(path.read_text(), package):
            top = module.split(".")[0]
            if top == "pipeline" or (top == "app" and not module.startswith("app.fakenode.")):
                offenders.append(f"{path.relative_to(FAKENODE)} imports {module}")
    assert not offenders, offenders


def test_the_import_check_sees_what_it_must_reject():
    source = ("import pipeline.ring\nfrom app import netutil\nfrom .. import server\n"
              "from . import names\nfrom app.fakenode.sim import Profile\n")
    assert _imported_modules(source, "app.fakenode") == [
        "pipeline.ring", "app.netutil", "app.server", "app.fakenode.names",
        "app.fakenode.sim.Profile"]


@pytest.mark.parametrize(("given", "short", "owner"), [
    ("llama3.2", "llama3.2:latest", "library"),
    ("LLAMA3.2:Latest", "llama3.2:latest", "library"),
    ("registry.ollama.ai/library/llama3.2:latest", "llama3.2:latest", "library"),
    ("me/tiny", "me/tiny:latest", "me"),
    ("localhost:5000/me/tiny:q4", "localhost:5000/me/tiny:q4", "me"),
])
def test_model_names_follow_the_references_rules(given, short, owner):
    assert names.short(given) == short
    assert names.namespace_of(given) == owner
    assert names.key(given) == names.key(short)  # one model, whichever way it is written
    assert names.is_valid(given)


@pytest.mark.parametrize("bad", ["", "llama3.2:", "/llama3.2", "me/", "a/b/c/d", "bad name",
                                 "-dash", "dotted.ns/model", "x" * 81])
def test_invalid_model_names_are_rejected(bad):
    assert not names.is_valid(bad)


# --- the HTTP control routes are off unless asked for --------------------------------------------

GEN = {"model": "m", "prompt": "hi", "stream": False}


def test_control_routes_answer_404_unless_the_fault_api_is_on(fake_node):
    node = fake_node(["m"])
    r = requests.post(f"{node.url}/_fake/fault", json={"mode": "500"}, timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")
    assert r.headers["Content-Type"].startswith("text/plain")
    assert requests.get(f"{node.url}/_fake/stats", timeout=5).status_code == 404
    assert node.node.fault == "none"  # the request changed nothing
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200


def test_the_fault_api_sets_a_counted_fault_over_http(fake_node):
    node = fake_node(["m"], fault_api=True)
    r = requests.post(f"{node.url}/_fake/fault", json={"mode": "500", "count": 1}, timeout=5)
    assert (r.status_code, r.json()) == (200, {"fault": "500"})
    first = requests.post(f"{node.url}/api/generate", json=GEN, timeout=5)
    assert first.status_code == 500 and "runner" in first.json()["error"]
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200
    stats = requests.get(f"{node.url}/_fake/stats", timeout=5).json()
    assert stats["by_path"]["/api/generate"] == 2 and stats["fault"] == "500"
    bad = requests.post(f"{node.url}/_fake/fault", json={"mode": "melt"}, timeout=5)
    assert bad.status_code == 400 and "unknown fault" in bad.json()["error"]


def test_in_process_set_fault_works_without_the_fault_api(fake_node):
    node = fake_node(["m"])
    node.node.set_fault("503", count=1)
    busy = requests.post(f"{node.url}/api/generate", json=GEN, timeout=5)
    assert busy.status_code == 503 and busy.json()["error"].startswith("server busy")
    assert requests.post(f"{node.url}/api/generate", json=GEN, timeout=5).status_code == 200
    with pytest.raises(ValueError, match="unknown fault"):
        node.node.set_fault("melt")


def _start_command(*extra: str) -> tuple[subprocess.Popen[str], str]:
    """``ollama-lb fake-node`` on port 0; returns the process and the URL it printed."""
    p = subprocess.Popen([sys.executable, "-m", "app", "fake-node", "--port", "0", "--models",
                          "tiny", "--profile", "fast", *extra], stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL, text=True)
    line = p.stdout.readline() if p.stdout else ""
    match = re.search(r"http://127\.0\.0\.1:\d+", line)
    if match is None:
        p.kill()
        p.wait(timeout=10)
        pytest.fail(f"fake-node printed no URL: {line!r}")
    return p, match.group(0)


@pytest.mark.parametrize(("flag", "status"), [((), 404), (("--fault-api",), 200)])
def test_fake_node_command_serves_the_control_routes_only_with_fault_api(flag, status):
    p, url = _start_command(*flag)
    try:
        r = requests.post(f"{url}/_fake/fault", json={"mode": "503", "count": 1}, timeout=5)
        assert r.status_code == status
        gen = requests.post(f"{url}/api/generate", json={**GEN, "model": "tiny"}, timeout=5)
        assert gen.status_code == (503 if status == 200 else 200)
    finally:
        p.terminate()
        p.wait(timeout=10)


# --- /v1/responses (OpenAI Responses API) ---------------------------------------------------------

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "why blue?"}]
RESPONSE_EVENTS = ["response.created", "response.in_progress", "response.output_item.added",
                   "response.content_part.added"]
RESPONSE_TAIL = ["response.output_text.done", "response.content_part.done",
                 "response.output_item.done", "response.completed"]


def _openai(node):
    return openai.OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0)


def _chat_text(node, messages):
    r = requests.post(f"{node.url}/api/chat", json={"model": "m", "messages": messages,
                                                     "stream": False}, timeout=10)
    return r.json()["message"]["content"]


def test_responses_api_answers_in_the_references_shape(fake_node):
    node = fake_node(["m"])
    with _openai(node) as client:
        reply = client.responses.create(model="m", instructions="be brief", input="why blue?")
    assert reply.id.startswith("resp_") and reply.object == "response"
    assert reply.status == "completed" and reply.model == "m"
    assert reply.instructions == "be brief" and reply.completed_at >= reply.created_at
    item = reply.output[0]
    assert (item.type, item.role, item.status) == ("message", "assistant", "completed")
    assert item.id.startswith("msg_") and item.content[0].type == "output_text"
    assert reply.output_text == _chat_text(node, CHAT)  # one model behind every API
    assert reply.usage.output_tokens == 8 and reply.usage.input_tokens >= 1
    assert reply.usage.total_tokens == reply.usage.input_tokens + reply.usage.output_tokens


def test_responses_api_streams_numbered_events_ending_in_completed(fake_node):
    node = fake_node(["m"])
    with _openai(node) as client:
        events = list(client.responses.create(model="m", input=CHAT, stream=True,
                                              max_output_tokens=5))
    kinds = [e.type for e in events]
    assert kinds == RESPONSE_EVENTS + ["response.output_text.delta"] * 5 + RESPONSE_TAIL
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    final = events[-1].response
    assert final.status == "completed" and final.output_text == text
    assert final.usage.output_tokens == 5 and final.max_output_tokens == 5
    assert text.split() == _chat_text(node, CHAT).split()[:5]  # the same reply, cut at 5


def test_responses_api_errors_take_openais_shape(fake_node):
    node = fake_node(["m"])
    with _openai(node) as client:
        with pytest.raises(openai.NotFoundError) as missing:
            client.responses.create(model="nope", input="x")
        assert missing.value.body == {"message": "model 'nope' not found",
                                      "type": "not_found_error", "param": None, "code": None}
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(model="m", input=[{"type": "bogus"}])
        assert bad.value.body["message"] == 'input[0]: unknown input item type: "bogus"'
        with pytest.raises(openai.BadRequestError, match="invalid reasoning value"):
            client.responses.create(model="m", input="x", reasoning={"effort": "huge"})
        node.node.set_fault("503", count=1)
        with pytest.raises(openai.InternalServerError) as busy:
            client.responses.create(model="m", input="x")
        assert busy.value.status_code == 503 and busy.value.body["type"] == "api_error"
    r = requests.post(f"{node.url}/v1/responses", json={"input": "x"}, timeout=5)
    assert r.status_code == 400 and r.json()["error"]["message"] == "model is required"


def test_responses_stream_cut_mid_way_ends_without_completed_as_ollamas(fake_node):
    node = fake_node(["m"], fault="error-mid-stream")
    with _openai(node) as client:
        events = list(client.responses.create(model="m", input="x", stream=True))
    kinds = [e.type for e in events]
    assert kinds == RESPONSE_EVENTS + ["response.output_text.delta"] * 2
    assert node.stats.active == 0 and node.stats.streams_open == 0  # the slot came back


# --- /v1/messages (Anthropic Messages API) --------------------------------------------------------

MESSAGES = {"model": "m", "max_tokens": 1024, "system": "be brief",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "why blue?"}]}]}


def _sse(response) -> list[tuple[str, dict]]:
    """(event name, data) for each SSE event of a streamed reply."""
    events, name, data = [], None, []
    for line in response.iter_lines(decode_unicode=True):
        if line.startswith("event: "):
            name = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and (name or data):
            events.append((name, json.loads("\n".join(data))))
            name, data = None, []
    return events


def test_messages_api_answers_an_anthropic_message(fake_node):
    node = fake_node(["m"])
    r = requests.post(f"{node.url}/v1/messages", json=MESSAGES, timeout=10)
    assert r.status_code == 200 and r.headers["Content-Type"].startswith("application/json")
    msg = r.json()
    assert re.fullmatch(r"msg_[0-9a-f]{24}", msg["id"])
    assert (msg["type"], msg["role"], msg["model"]) == ("message", "assistant", "m")
    assert msg["content"] == [{"type": "text", "text": _chat_text(node, CHAT)}]
    assert msg["stop_reason"] == "end_turn"  # a natural-length reply, well under 1024
    assert msg["usage"]["output_tokens"] == 8 and msg["usage"]["input_tokens"] >= 1
    cut = requests.post(f"{node.url}/v1/messages", json={**MESSAGES, "max_tokens": 3},
                        timeout=10).json()
    assert cut["stop_reason"] == "max_tokens" and cut["usage"]["output_tokens"] == 3


def test_messages_api_streams_anthropics_event_sequence(fake_node):
    node = fake_node(["m"])
    with requests.post(f"{node.url}/v1/messages", json={**MESSAGES, "stream": True},
                       stream=True, timeout=10) as r:
        assert r.headers["Content-Type"] == "text/event-stream"
        events = _sse(r)
    names = [name for name, _ in events]
    assert names == (["message_start", "content_block_start"] + ["content_block_delta"] * 8
                     + ["content_block_stop", "message_delta", "message_stop"])
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["role"] == "assistant" and start["content"] == [] and start["id"][:4] == "msg_"
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == _chat_text(node, CHAT)
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn" and delta["usage"]["output_tokens"] == 8


@pytest.mark.parametrize(("body", "status", "kind", "message"), [
    ({**MESSAGES, "model": "nope"}, 404, "not_found_error", "model 'nope' not found"),
    ({**MESSAGES, "model": ""}, 400, "invalid_request_error", "model is required"),
    ({k: v for k, v in MESSAGES.items() if k != "max_tokens"}, 400, "invalid_request_error",
     "max_tokens is required and must be positive"),
    ({**MESSAGES, "messages": []}, 400, "invalid_request_error", "messages is required"),
    ({**MESSAGES, "max_tokens": "lots"}, 400, "invalid_request_error",
     "json: cannot unmarshal string into Go struct field MessagesRequest.max_tokens of type "
     "int"),
])
def test_messages_api_errors_take_anthropics_shape(fake_node, body, status, kind, message):
    node = fake_node(["m"])
    r = requests.post(f"{node.url}/v1/messages", json=body, timeout=10)
    err = r.json()
    assert r.status_code == status and err["type"] == "error"
    assert err["error"] == {"type": kind, "message": message}


def test_messages_api_overload_and_bad_json_take_anthropics_shape(fake_node):
    node = fake_node(["m"])
    node.node.set_fault("503", count=1)
    busy = requests.post(f"{node.url}/v1/messages", json=MESSAGES, timeout=10)
    assert busy.status_code == 503 and busy.json()["error"]["type"] == "overloaded_error"
    bad = requests.post(f"{node.url}/v1/messages", data=b"{nope", timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert requests.get(f"{node.url}/v1/messages", timeout=10).status_code == 405


# --- one timing model behind every API ------------------------------------------------------------

STREAMS = {
    "chat": ("/api/chat", {"model": "m", "messages": CHAT}),
    "responses": ("/v1/responses", {"model": "m", "input": CHAT, "stream": True}),
    "messages": ("/v1/messages", {**MESSAGES, "stream": True}),
}


@pytest.mark.parametrize("api", sorted(STREAMS))
def test_every_api_waits_for_the_cold_load_and_shares_the_parallel_slots(fake_node, api):
    node = fake_node(["m"], load_s=0.3, decode_tps=40, num_parallel=1)
    path, body = STREAMS[api]
    firsts: list[float] = []

    def one() -> None:
        t0 = time.monotonic()
        with requests.post(node.url + path, json=body, stream=True, timeout=10) as r:
            lines = r.iter_lines()
            assert next(lines)  # the first frame: after the load, the slot and the prefill
            firsts.append(time.monotonic() - t0)
            assert sum(1 for _ in lines) > 0

    jobs = [gevent.spawn(one) for _ in range(2)]
    gevent.joinall(jobs, raise_error=True, timeout=20)
    assert all(j.successful() for j in jobs)
    assert node.stats.loads == 1  # one cold load, the second request waited for it
    assert node.stats.max_active == 1  # one slot: the second stream queued behind the first
    assert min(firsts) >= 0.3  # no first byte before the model was loaded
