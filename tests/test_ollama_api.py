"""The appliance looks like one Ollama server to the official clients (issue: foundation)."""

from __future__ import annotations

import json
import time

import gevent
import ollama
import openai
import pytest
import requests


@pytest.fixture
def pool(fake_node, appliance):
    """Two simulated nodes with different models behind the appliance."""
    a = fake_node(["llama3.2", "all-minilm"])
    b = fake_node(["llama3.2", "mistral"])
    lb = appliance([a, b])
    return lb, a, b


def test_generate_and_chat_match_a_direct_node(pool):
    lb, a, _ = pool
    via, direct = ollama.Client(host=lb.url), ollama.Client(host=a.url)
    g1 = via.generate(model="llama3.2", prompt="Why is the sky blue?")
    g2 = direct.generate(model="llama3.2", prompt="Why is the sky blue?")
    assert g1.response == g2.response and g1.response
    assert g1.done_reason == "stop" and g1.context == g2.context
    msgs = [{"role": "user", "content": "hello there"}]
    c1, c2 = via.chat(model="llama3.2", messages=msgs), direct.chat(model="llama3.2",
                                                                      messages=msgs)
    assert c1.message.content == c2.message.content and c1.message.role == "assistant"


def test_streamed_generate_and_chat_arrive_in_chunks_with_the_same_text(pool):
    lb, a, _ = pool
    via, direct = ollama.Client(host=lb.url), ollama.Client(host=a.url)
    parts = list(via.generate(model="llama3.2", prompt="stream me", stream=True))
    assert len(parts) == 9 and parts[-1].done and not parts[0].done
    assert "".join(p.response for p in parts) == direct.generate(
        model="llama3.2", prompt="stream me").response
    chat = list(via.chat(model="llama3.2", messages=[{"role": "user", "content": "x"}],
                         stream=True))
    assert chat[-1].done and chat[-1].eval_count == len(chat) - 1
    assert "".join(c.message.content for c in chat) == direct.chat(
        model="llama3.2", messages=[{"role": "user", "content": "x"}]).message.content


def test_embed_and_legacy_embeddings(pool):
    lb, a, _ = pool
    via = ollama.Client(host=lb.url)
    out = via.embed(model="all-minilm", input=["one", "two"])
    assert len(out.embeddings) == 2
    assert out.embeddings == ollama.Client(host=a.url).embed(model="all-minilm",
                                                              input=["one", "two"]).embeddings
    legacy = via.embeddings(model="all-minilm", prompt="one")
    assert len(legacy.embedding) == 16


def test_list_is_the_union_of_the_nodes_models(pool):
    lb, _, _ = pool
    names = sorted(m.model for m in ollama.Client(host=lb.url).list().models)
    assert names == ["all-minilm:latest", "llama3.2:latest", "mistral:latest"]


def test_ps_shows_models_loaded_on_any_node(pool):
    lb, _, _ = pool
    client = ollama.Client(host=lb.url)
    client.generate(model="mistral", prompt="load me")
    loaded = [m.model for m in client.ps().models]
    assert "mistral:latest" in loaded
    assert all(m.expires_at is not None for m in client.ps().models)


def test_show_and_version(fake_node, appliance):
    a = fake_node(["llama3.2"])
    b = fake_node(["llama3.2"])
    b.node.version = "0.9.1"
    lb = appliance([a, b])
    client = ollama.Client(host=lb.url)
    shown = client.show("llama3.2")
    assert shown.modelinfo is not None and shown.details.family == "llama3.2"
    assert requests.get(f"{lb.url}/api/version", timeout=5).json() == {"version": "0.9.1"}


def test_unknown_model_is_a_404_in_ollamas_words(pool):
    lb, _, _ = pool
    client = ollama.Client(host=lb.url)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="hi")
    assert err.value.status_code == 404 and err.value.error == "model 'nope' not found"
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="nope", input="hi")
    assert err.value.error == 'model "nope" not found, try pulling it first'
    with pytest.raises(ollama.ResponseError) as err:
        client.show("nope")
    assert err.value.status_code == 404


def test_openai_sdk_chat_streaming_and_models(pool):
    lb, _, _ = pool
    client = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="ollama")
    reply = client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(
        model="llama3.2", messages=[{"role": "user", "content": "hi"}], stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == reply.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == "stop"
    ids = sorted(m.id for m in client.models.list())
    assert ids == ["all-minilm:latest", "llama3.2:latest", "mistral:latest"]
    assert client.models.retrieve("mistral").id == "mistral"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    emb = client.embeddings.create(model="all-minilm", input=["a", "b"])
    assert len(emb.data) == 2


def test_openai_completions_and_unknown_model(pool):
    lb, _, _ = pool
    client = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="ollama")
    assert client.completions.create(model="mistral", prompt="say").choices[0].text
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert "model 'nope' not found" in str(err.value)


# --- bad input: Ollama's error shape and status, nothing forwarded ------------------------------

def _post(lb, path, data, **kw):
    return requests.post(f"{lb.url}{path}", data=data, timeout=5, **kw)


def test_malformed_json_is_400_and_not_forwarded(pool):
    lb, a, b = pool
    before = a.stats.requests + b.stats.requests
    r = _post(lb, "/api/generate", b"{not json")
    assert r.status_code == 400
    assert r.json()["error"].startswith("invalid character 'n'")
    assert r.headers["Content-Type"].startswith("application/json")
    assert a.stats.requests + b.stats.requests == before


def test_empty_body_is_400_missing_request_body(pool):
    lb, _, _ = pool
    r = _post(lb, "/api/chat", b"")
    assert (r.status_code, r.json()) == (400, {"error": "missing request body"})


def test_missing_model_follows_each_endpoints_wording(pool):
    lb, _, _ = pool
    r = _post(lb, "/api/generate", json.dumps({"prompt": "hi"}))
    assert (r.status_code, r.json()) == (404, {"error": "model '' not found"})
    r = _post(lb, "/api/chat", json.dumps({"messages": []}))
    assert (r.status_code, r.json()) == (400, {"error": "model is required"})


def test_wrong_field_type_gets_the_go_decoder_message(pool):
    lb, _, _ = pool
    r = _post(lb, "/api/chat", json.dumps({"model": "llama3.2", "stream": "yes"}))
    assert r.status_code == 400
    assert r.json()["error"] == ("json: cannot unmarshal string into Go struct field "
                                 "ChatRequest.stream of type bool")


def test_body_over_the_limit_is_413(fake_node, appliance):
    a = fake_node(["llama3.2"])
    lb = appliance([a], server={"maxBodyBytes": 1000})
    r = _post(lb, "/api/generate", json.dumps({"model": "llama3.2", "prompt": "x" * 2000}))
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert a.stats.by_path.get("/api/generate") is None


def test_unknown_path_and_wrong_method_answer_like_gin(pool):
    lb, _, _ = pool
    r = requests.get(f"{lb.url}/api/nothing", timeout=5)
    assert (r.status_code, r.text) == (404, "404 page not found")
    r = requests.get(f"{lb.url}/api/generate", timeout=5)
    assert (r.status_code, r.text) == (405, "405 method not allowed")


def test_root_answers_ollama_is_running_for_get_and_head(pool):
    lb, _, _ = pool
    assert requests.get(lb.url, timeout=5).text == "Ollama is running"
    assert requests.head(lb.url, timeout=5).status_code == 200


def test_body_is_forwarded_byte_for_byte_whatever_the_content_type(pool):
    lb, _a, b = pool
    raw = b'{"model":"mistral","prompt":"hi","stream":false,"x-unknown":{"kept":[1,2]}}'
    r = _post(lb, "/api/generate", raw,
              headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"] is True
    assert b.stats.last_body == raw


def test_node_sees_its_own_address_as_host(pool):
    lb, _, b = pool
    _post(lb, "/api/generate", json.dumps({"model": "mistral", "prompt": "x", "stream": False}),
          headers={"Host": "appliance.example.com"})
    assert f"127.0.0.1:{b.port}" in b.stats.hosts
    assert "appliance.example.com" not in b.stats.hosts


def test_request_id_is_echoed_and_forwarded(pool):
    lb, _, _ = pool
    r = _post(lb, "/api/generate", json.dumps({"model": "mistral", "prompt": "x",
                                               "stream": False}),
              headers={"X-Request-ID": "abc-123"})
    assert r.headers["X-Request-ID"] == "abc-123"


def test_curl_style_request_streams_ndjson_by_default(pool):
    lb, _, _ = pool
    r = _post(lb, "/api/generate", json.dumps({"model": "llama3.2", "prompt": "x"}))
    assert r.headers["Content-Type"] == "application/x-ndjson"
    lines = r.content.split(b"\n")
    assert lines[-1] == b"" and all(line for line in lines[:-1])  # never a blank line
    assert json.loads(lines[-2])["done"] is True


# --- streaming: as produced, and cleaned up when the client leaves ------------------------------

def test_first_token_arrives_while_the_node_is_still_generating(fake_node, appliance):
    slow = fake_node(["llama3.2"], decode_tps=20, tokens=20)  # ~1 s of generation
    lb = appliance([slow])
    t0 = time.monotonic()
    stream = ollama.Client(host=lb.url).generate(model="llama3.2", prompt="x", stream=True)
    first = next(iter(stream))
    first_at = time.monotonic() - t0
    assert not first.done
    assert slow.stats.streams_open == 1  # the node is still generating
    rest = list(stream)
    assert rest[-1].done and first_at < (time.monotonic() - t0) / 2


def test_client_disconnect_mid_stream_closes_the_upstream_request(fake_node, appliance):
    slow = fake_node(["llama3.2"], decode_tps=20, tokens=200)
    lb = appliance([slow])
    r = requests.post(f"{lb.url}/api/generate", json={"model": "llama3.2", "prompt": "x"},
                      stream=True, timeout=10)
    lines = r.iter_lines()
    assert json.loads(next(lines))["done"] is False
    r.close()  # the client goes away mid-stream
    deadline = time.monotonic() + 5
    while slow.stats.disconnects == 0 and time.monotonic() < deadline:
        gevent.sleep(0.05)
    assert slow.stats.disconnects == 1 and slow.stats.streams_open == 0
    assert lb.factory.node_registry.get("n0").in_flight == 0


def test_cors_like_ollama_for_browser_clients(fake_node, appliance):
    lb = appliance([fake_node(["m"])], server={"allowedOrigins": ["https://chat.example.com"]})
    pre = requests.options(f"{lb.url}/api/chat", timeout=5, headers={
        "Origin": "http://localhost:3000", "Access-Control-Request-Method": "POST"})
    assert pre.status_code == 204
    assert pre.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"
    assert "Content-Type" in pre.headers["Access-Control-Allow-Headers"]
    r = requests.get(f"{lb.url}/api/tags", headers={"Origin": "https://chat.example.com"},
                     timeout=5)
    assert r.headers["Access-Control-Allow-Origin"] == "https://chat.example.com"
    other = requests.get(f"{lb.url}/api/tags", headers={"Origin": "https://evil.example"},
                         timeout=5)
    assert "Access-Control-Allow-Origin" not in other.headers
    denied = requests.options(f"{lb.url}/api/chat", headers={"Origin": "https://evil.example"},
                              timeout=5)
    assert denied.status_code == 403
