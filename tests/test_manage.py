"""Pool-wide operations: unload, pull, create, copy, delete, blobs (fan-out)."""

from __future__ import annotations

import hashlib
import json

import ollama
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
    assert "n1" in lines[-1]["error"]


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
