"""The simulated Ollama node on its own: no appliance in between, real sockets, real clients.

The node is the judge of what Ollama would see in every other test, so it must stand apart
from the appliance (no shared code) and follow the reference's shapes itself.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import gevent
import ollama
import openai
import pytest
import requests
from gevent import socket as gsocket

from app.fakenode import names
from tests.sse import sse_events

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


def test_responses_api_with_nothing_to_say_only_loads_the_model(fake_node):
    node = fake_node(["m"])
    with _openai(node) as client:
        reply = client.responses.create(model="m", input=[])
        events = list(client.responses.create(model="m", input=[], stream=True))
    assert reply.output_text == "" and reply.usage.output_tokens == 0
    assert [e.type for e in events] == ["response.created", "response.in_progress",
                                        "response.completed"]
    assert node.stats.loads == 1 and node.stats.max_active == 0  # loaded, nothing generated


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
        events = sse_events(r)
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


# --- model management with the official client ---------------------------------------------------

LIBRARY = ["llama3.2", "all-minilm", "qwen2.5:0.5b"]


def _layers(progress) -> dict[str, list]:
    """Per-digest progress lines of a pull or push, in order."""
    out: dict[str, list] = {}
    for p in progress:
        if p.digest:
            out.setdefault(p.digest, []).append(p)
    return out


def test_pull_streams_monotonic_progress_per_layer_then_success(fake_node):
    node = fake_node(["m"], library=LIBRARY)
    client = ollama.Client(host=node.url)
    progress = list(client.pull("llama3.2", stream=True))
    assert progress[0].status == "pulling manifest"
    assert [p.status for p in progress[-3:]] == ["verifying sha256 digest", "writing manifest",
                                                 "success"]
    layers = _layers(progress)
    assert len(layers) == 6  # weights, template, two licenses, params, and the config
    for digest, lines in layers.items():
        assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
        assert {p.status for p in lines} == {f"pulling {digest[7:19]}"}
        assert len({p.total for p in lines}) == 1 and lines[0].total > 0
        done = [p.completed for p in lines if p.completed is not None]
        assert done == sorted(done) and done[-1] == lines[0].total
    weights = max(layers.values(), key=lambda lines: lines[0].total)
    assert len(weights) > 10  # a 2 GB layer reports its progress as it goes
    listed = {m.model: m for m in client.list().models}["llama3.2:latest"]
    assert listed.size == sum(lines[0].total for lines in layers.values())
    for digest in layers:  # the pulled layers are blobs on the node now
        assert requests.head(f"{node.url}/api/blobs/{digest}", timeout=5).status_code == 200
    assert client.pull("all-minilm").status == "success"  # stream=False: the last status
    assert client.show("all-minilm").capabilities == ["embedding"]


def test_pull_of_a_model_the_node_has_skips_every_layer(fake_node):
    node = fake_node(["llama3.2"], library=LIBRARY)
    progress = list(ollama.Client(host=node.url).pull("llama3.2", stream=True))
    for lines in _layers(progress).values():
        assert [(p.completed, p.total) for p in lines] == [(lines[0].total, lines[0].total)]
    assert progress[-1].status == "success"


def test_pull_of_an_unknown_model_fails_as_ollama_does(fake_node):
    node = fake_node(["m"], library=LIBRARY)
    client = ollama.Client(host=node.url)
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.pull("no-such-model", stream=True))
    assert streamed.value.error == "pull model manifest: file does not exist"
    assert streamed.value.status_code == -1  # an error line inside a 200 stream
    r = requests.post(f"{node.url}/api/pull", json={"model": "no-such-model"}, timeout=5)
    assert r.status_code == 200
    assert [json.loads(x) for x in r.text.splitlines()] == [
        {"status": "pulling manifest"}, {"error": "pull model manifest: file does not exist"}]
    with pytest.raises(ollama.ResponseError) as whole:
        client.pull("no-such-model")
    assert whole.value.status_code == 500
    bad = requests.post(f"{node.url}/api/pull", json={"model": "bad name!"}, timeout=5)
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid model name"})
    assert not node.node.sim.has("no-such-model")


def test_pull_takes_the_time_the_profiles_rate_gives(fake_node):
    node = fake_node(["m"], library=LIBRARY, pull_bps=20e9)  # ~2 GB: at least 0.1 s
    t0 = time.monotonic()
    assert ollama.Client(host=node.url).pull("llama3.2").status == "success"
    assert time.monotonic() - t0 >= 0.1


def test_push_streams_per_layer_progress(fake_node):
    node = fake_node(["m"])
    client = ollama.Client(host=node.url)
    progress = list(client.push("m", stream=True))
    assert progress[0].status == "retrieving manifest"
    assert [p.status for p in progress[-2:]] == ["pushing manifest", "success"]
    for digest, lines in _layers(progress).items():
        assert {p.status for p in lines} == {f"pushing {digest[7:19]}"}
        assert [p.completed for p in lines if p.completed][-1] == lines[0].total
    with pytest.raises(ollama.ResponseError) as missing:
        client.push("ghost")
    assert missing.value.status_code == 404


def test_create_from_an_installed_model_adds_a_system_layer(fake_node):
    node = fake_node(["m"])
    client = ollama.Client(host=node.url)
    statuses = [p.status for p in client.create(model="brief", from_="m", system="be brief",
                                                stream=True)]
    system_digest = "sha256:" + hashlib.sha256(b"be brief").hexdigest()
    assert statuses[:5] == ["using existing layer " + s.split()[-1] for s in statuses[:5]]
    assert statuses[5:] == [f"creating new layer {system_digest}", "writing manifest",
                            "success"]
    again = [p.status for p in client.create(model="brief2", from_="m", system="be brief",
                                             stream=True)]
    assert f"using existing layer {system_digest}" in again
    listed = {m.model: m.digest for m in client.list().models}
    assert listed["brief:latest"] != listed["m:latest"]  # a new manifest
    assert 'SYSTEM """be brief"""' in client.show("brief").modelfile
    assert client.generate(model="brief", prompt="hi").done


def test_create_from_a_library_model_pulls_it_first(fake_node):
    node = fake_node(["m"], library=LIBRARY)
    client = ollama.Client(host=node.url)
    statuses = [p.status for p in client.create(model="tiny", from_="qwen2.5:0.5b",
                                                stream=True)]
    assert statuses[0] == "pulling manifest"
    pulled = statuses.index("success")  # the pull's own end, ahead of create's lines
    assert pulled < len(statuses) - 1 and statuses[pulled - 1] == "writing manifest"
    assert statuses[pulled + 1].startswith("using existing layer sha256:")
    assert statuses[-2:] == ["writing manifest", "success"]
    assert node.node.sim.has("qwen2.5:0.5b") and node.node.sim.has("tiny")
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        client.create(model="other", from_="not-in-the-library")


def test_create_from_uploaded_gguf_files(fake_node, tmp_path):
    node = fake_node(["m"])
    client = ollama.Client(host=node.url)
    weights = tmp_path / "model.gguf"
    weights.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    digest = client.create_blob(weights)
    assert requests.head(f"{node.url}/api/blobs/{digest}", timeout=5).status_code == 200
    statuses = [p.status for p in client.create(model="local", files={"model.gguf": digest},
                                                stream=True)]
    assert statuses == ["parsing GGUF", f"using existing layer {digest}", "writing manifest",
                        "success"]
    assert client.generate(model="local", prompt="hi").done
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"not weights")
    with pytest.raises(ollama.ResponseError, match="not in GGUF format") as not_gguf:
        client.create(model="bad", files={"notes.txt": client.create_blob(notes)})
    assert not_gguf.value.status_code == 400
    missing = "sha256:" + "0" * 64
    with pytest.raises(ollama.ResponseError, match="no such file") as absent:
        client.create(model="bad", files={"model.gguf": missing})
    assert absent.value.status_code == 400
    r = requests.post(f"{node.url}/api/create", json={"model": "bad"}, timeout=5)
    assert (r.status_code, r.json()) == (400, {"error": "neither 'from' or 'files' was "
                                                        "specified"})


def test_copy_and_delete_keep_the_digest_and_prune_blobs(fake_node):
    node = fake_node(["m"])
    client = ollama.Client(host=node.url)
    client.copy("m", "m-copy")
    listed = {m.model: m.digest for m in client.list().models}
    assert listed["m-copy:latest"] == listed["m:latest"]  # the same manifest
    client.create(model="brief", from_="m", system="be brief")
    system_blob = "sha256:" + hashlib.sha256(b"be brief").hexdigest()
    assert system_blob in node.node.blobs
    assert client.delete("brief").status == "success"
    assert system_blob not in node.node.blobs  # only brief used it
    assert client.delete("m-copy").status == "success"
    assert {m.model for m in client.list().models} == {"m:latest"}
    with pytest.raises(ollama.ResponseError) as gone:
        client.delete("m-copy")
    assert (gone.value.status_code, gone.value.error) == (404, "model 'm-copy' not found")
    with pytest.raises(ollama.ResponseError) as ghost:
        client.copy("ghost", "g2")
    assert (ghost.value.status_code, ghost.value.error) == (404, 'model "ghost" not found')
    with pytest.raises(ollama.ResponseError) as bad:
        client.copy("m", "bad name")
    assert (bad.value.status_code, bad.value.error) == (400, 'destination "bad name" is invalid')


def test_an_empty_prompt_loads_and_keep_alive_zero_unloads(fake_node):
    node = fake_node(["m", "n"])
    client = ollama.Client(host=node.url)
    assert client.ps().models == []
    assert client.generate(model="m").done_reason == "load"
    assert client.chat(model="n", messages=[], keep_alive=-1).done_reason == "load"
    loaded = {m.model: m for m in client.ps().models}
    assert set(loaded) == {"m:latest", "n:latest"}
    assert loaded["n:latest"].expires_at.year > 2300  # pinned
    assert client.generate(model="m", keep_alive=0).done_reason == "unload"
    assert [m.model for m in client.ps().models] == ["n:latest"]
    assert client.chat(model="n", messages=[], keep_alive=0).done_reason == "unload"
    assert client.ps().models == [] and node.stats.loads == 2


# --- blob uploads -------------------------------------------------------------------------------

def test_a_200_mb_blob_is_hashed_as_it_arrives_never_held_whole(fake_node, tmp_path):
    node = fake_node(["m"])
    big = tmp_path / "big.gguf"
    with big.open("wb") as f:  # sparse: 200 MiB without writing them
        f.write(b"GGUF")
        f.truncate(200 * 1024 * 1024)
    client = ollama.Client(host=node.url)
    tracemalloc.start()
    try:
        digest = client.create_blob(big)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 32 * 1024 * 1024, f"peak {peak} bytes"
    assert node.node.blobs[digest].size == 200 * 1024 * 1024
    assert requests.head(f"{node.url}/api/blobs/{digest}", timeout=5).status_code == 200


def test_blob_uploads_answer_201_200_and_400_as_ollama_does(fake_node):
    node = fake_node(["m"])
    data = b"GGUF small"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    url = f"{node.url}/api/blobs/{digest}"
    assert requests.head(url, timeout=5).status_code == 404
    created = requests.post(url, data=data, timeout=5)
    assert (created.status_code, created.content) == (201, b"")
    assert requests.post(url, data=data, timeout=5).status_code == 200
    assert requests.post(url, data=b"anything", timeout=5).status_code == 200  # not read
    dashed = url.replace("sha256:", "sha256-")
    assert requests.head(dashed, timeout=5).status_code == 200  # either spelling
    other = "sha256:" + hashlib.sha256(b"x").hexdigest()
    bad = requests.post(f"{node.url}/api/blobs/{other}", data=data, timeout=5)
    assert bad.status_code == 400
    assert bad.json() == {"error": f'digest mismatch, expected "{other}", got "{digest}"'}
    assert other not in node.node.blobs
    wrong = requests.post(f"{node.url}/api/blobs/sha256:xyz", data=data, timeout=5)
    assert (wrong.status_code, wrong.json()) == (400, {"error": "invalid digest format"})


def test_fake_node_command_pulls_only_what_its_library_has():
    p, url = _start_command("--library", "llama3.2", "--pull-mbps", "1000000")
    try:
        client = ollama.Client(host=url)
        assert client.pull("llama3.2").status == "success"
        with pytest.raises(ollama.ResponseError, match="file does not exist"):
            client.pull("mistral")
    finally:
        p.terminate()
        p.wait(timeout=10)


# --- a client that leaves -----------------------------------------------------------------------

def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        gevent.sleep(0.02)
    return predicate()


@pytest.mark.parametrize("path", ["/api/generate", "/v1/responses", "/v1/messages"])
def test_a_client_leaving_a_non_streamed_reply_cancels_the_generation(fake_node, path):
    node = fake_node(["m"], decode_tps=10.0, tokens=100)  # 10 s of generation
    body = {"/api/generate": {"model": "m", "prompt": "x", "stream": False},
            "/v1/responses": {"model": "m", "input": "x"},
            "/v1/messages": {**MESSAGES, "max_tokens": 100}}[path]
    payload = json.dumps(body).encode()
    sock = gsocket.create_connection((node.host, node.port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
    assert _wait_for(lambda: node.stats.active == 1, 5)
    sock.close()
    assert _wait_for(lambda: node.stats.active == 0, 2)  # stopped within a token or two
    assert node.stats.disconnects == 1
    assert node.node.sim.loaded["registry.ollama.ai/library/m:latest"].busy == 0


def test_reset_mid_stream_on_a_whole_reply_drops_the_connection_and_nothing_else(fake_node):
    node = fake_node(["m"])
    node.node.set_fault("reset-mid-stream", count=1)
    with pytest.raises(requests.ConnectionError):
        requests.post(f"{node.url}/api/generate", json={"model": "m", "prompt": "x",
                                                        "stream": False}, timeout=10)
    again = requests.post(f"{node.url}/api/generate", json={"model": "m", "prompt": "x",
                                                            "stream": False}, timeout=10)
    assert again.status_code == 200 and again.json()["done"] is True
