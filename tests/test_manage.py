"""Pool-wide operations: unload, pull, create, copy, delete, blobs (fan-out)."""

from __future__ import annotations

import hashlib
import json

import gevent
import ollama
import pytest
import requests


def test_unload_with_keep_alive_zero_reaches_every_node_that_has_the_model(fake_node,
                                                                             appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], strategy={"type": "round-robin"})
    client = ollama.Client(host=lb.url)
    client.generate(model="m", prompt="x")
    client.generate(model="m", prompt="y")
    assert a.node.sim.loaded and b.node.sim.loaded
    reply = client.generate(model="m", keep_alive=0)
    assert reply.done_reason == "unload"
    assert not a.node.sim.loaded and not b.node.sim.loaded
    chat = client.chat(model="m", messages=[], keep_alive="0s")
    assert chat.done_reason == "unload" and chat.message.role == "assistant"


def test_preload_with_an_empty_prompt_loads_on_one_node(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    assert ollama.Client(host=lb.url).generate(model="m").done_reason == "load"
    assert len(a.node.sim.loaded) + len(b.node.sim.loaded) == 1


def test_pull_runs_on_every_node_and_streams_one_success(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    client = ollama.Client(host=lb.url)
    progress = list(client.pull("newmodel", stream=True))
    assert progress[0].status == "pulling manifest" and progress[-1].status == "success"
    assert a.node.sim.has("newmodel") and b.node.sim.has("newmodel")
    assert client.pull("other").status == "success"
    names = {m.model for m in client.list().models}
    assert {"newmodel:latest", "other:latest"} <= names


def test_pull_failure_on_one_node_is_reported_as_an_error(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], healthCheck={"intervalMs": 60_000})
    b.refuse()
    r = requests.post(f"{lb.url}/api/pull", json={"model": "x"}, timeout=10)
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert lines[0] == {"status": "pulling manifest"}
    assert lines[-1] == {"error": "n1: connection refused (done on n0)"}
    assert a.node.sim.has("x") and not b.node.sim.has("x")


def test_copy_and_delete_apply_on_every_node_that_has_the_model(fake_node, appliance):
    a, b, c = fake_node(["m"]), fake_node(["m"]), fake_node(["other"])
    lb = appliance([a, b, c])
    client = ollama.Client(host=lb.url)
    client.copy("m", "m-copy")
    assert a.node.sim.has("m-copy") and b.node.sim.has("m-copy")
    assert not c.node.sim.has("m-copy")
    assert client.delete("m-copy").status == "success"
    assert not a.node.sim.has("m-copy") and not b.node.sim.has("m-copy")
    r = requests.delete(f"{lb.url}/api/delete", json={"model": "ghost"}, timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": "model 'ghost' not found"})
    r = requests.post(f"{lb.url}/api/copy", json={"source": "ghost", "destination": "g2"},
                      timeout=5)
    assert (r.status_code, r.json()) == (404, {"error": 'model "ghost" not found'})


def test_create_from_a_model_goes_to_the_nodes_that_have_it(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["other"])
    lb = appliance([a, b])
    out = ollama.Client(host=lb.url).create(model="m-custom", from_="m", system="be brief")
    assert out.status == "success"
    assert a.node.sim.has("m-custom") and not b.node.sim.has("m-custom")


def test_blobs_are_uploaded_to_every_node(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    data = b"GGUF fake weights"
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert requests.head(f"{lb.url}/api/blobs/{digest}", timeout=5).status_code == 404
    r = requests.post(f"{lb.url}/api/blobs/{digest}", data=data, timeout=5)
    assert r.status_code == 201
    assert requests.head(f"{lb.url}/api/blobs/{digest}", timeout=5).status_code == 200
    assert requests.post(f"{lb.url}/api/blobs/{digest}", data=data, timeout=5).status_code == 200
    # a blob a node already has is answered 200 unread, as Ollama does: mismatch a new one
    fresh = "sha256:" + hashlib.sha256(b"never uploaded").hexdigest()
    bad = requests.post(f"{lb.url}/api/blobs/{fresh}", data=b"other", timeout=5)
    assert bad.status_code == 400 and "digest mismatch" in bad.json()["error"]


# --- per-node outcomes, books, drain ----------------------------------------------------------

def test_delete_and_copy_name_each_node_when_some_fail(fake_node, appliance):
    a, b, c = fake_node(["m"]), fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b, c], healthCheck={"intervalMs": 60_000})
    c.refuse()  # still believed serving: the fan-out finds out
    client = ollama.Client(host=lb.url)
    with pytest.raises(ollama.ResponseError) as copied:
        client.copy("m", "m-copy")
    assert copied.value.status_code == 502
    assert copied.value.error == ("copy 'm' failed on 1 of 3 nodes: n2: connection refused; "
                                  "done on n0, n1")
    assert a.node.sim.has("m-copy") and b.node.sim.has("m-copy")
    b.node.sim.remove("m-copy")  # gone there already: a stale list is no failure
    c.resume()
    assert client.delete("m-copy").status == "success"
    assert not a.node.sim.has("m-copy")
    bad = requests.post(f"{lb.url}/api/copy", json={"source": "m", "destination": "bad name"},
                        timeout=5)
    assert (bad.status_code, bad.json()) == (400, {"error": 'destination "bad name" is invalid'})


def test_management_requests_are_counted_and_logged(fake_node, appliance):
    import logging

    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    lines: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = lines.append  # type: ignore[method-assign]
    access = logging.getLogger("ollama_lb.access")
    access.addHandler(handler)
    try:
        client = ollama.Client(host=lb.url)
        assert client.pull("newmodel").status == "success"
        with pytest.raises(ollama.ResponseError):
            client.delete("ghost")
    finally:
        access.removeHandler(handler)
    pull = next(r for r in lines if r.path == "/api/pull")
    assert (pull.method, pull.model, pull.node, pull.status, pull.attempts) == (
        "POST", "newmodel", "all", "200", 2)
    assert next(r for r in lines if r.path == "/api/delete").status == "404"
    text = lb.factory.metrics_registry.scrape()
    assert 'ollama_lb_model_operations_total{operation="pull",outcome="success"} 1.0' in text
    assert ('ollama_lb_model_operations_total{operation="delete",outcome="client_error"} 1.0'
            in text)
    assert 'ollama_lb_model_operations_total{operation="create",outcome="failed"} 0.0' in text
    assert 'ollama_lb_model_operation_seconds_count{operation="pull"} 1.0' in text


def _pull_in_background(url: str):
    r = requests.post(f"{url}/api/pull", json={"model": "llama3.2"}, stream=True, timeout=20)
    lines = r.iter_lines()
    first = json.loads(next(lines))
    return first, gevent.spawn(lambda: [json.loads(x) for x in lines])


def test_shutdown_drains_a_pull_in_progress(fake_node, appliance):
    node = fake_node(["m"], library=["llama3.2"], pull_bps=4e9)  # ~0.5 s
    lb = appliance([node], check_leaks=False)
    first, rest = _pull_in_background(lb.url)
    assert first == {"status": "pulling manifest"}
    assert lb.factory.pipeline.in_flight == 1 and lb.factory.management.in_flight == 1
    lb.shutdown(drain_s=10)
    assert rest.get(timeout=10)[-1] == {"status": "success"}
    assert lb.exit_status == 0 and node.node.sim.has("llama3.2")


def test_shutdown_cuts_a_pull_past_the_drain_bound_with_one_error_line(fake_node, appliance):
    node = fake_node(["m"], library=["llama3.2"], pull_bps=0.5e9)  # ~4 s
    lb = appliance([node], check_leaks=False)
    _, rest = _pull_in_background(lb.url)
    lb.shutdown(drain_s=0.2)
    assert rest.get(timeout=10)[-1] == {
        "error": "server shutting down: stream cut after the drain bound"}
    assert lb.exit_status == 75 and not node.node.sim.has("llama3.2")
    assert lb.factory.pipeline.in_flight == 0 and not lb.factory.pipeline.streams
