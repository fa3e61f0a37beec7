"""One pool, one model list: pulls with merged per-layer progress, create from anywhere, blobs
of any size streamed to every node, per-node outcomes, and the placement reconciler.

Every test runs real simulated nodes (pull progress with sha256 layers, blobs hashed as they
arrive, create, copy, delete, load) behind the real appliance, driven by the official
``ollama`` client where it applies.
"""

from __future__ import annotations

import gc
import hashlib
import inspect
import json
import os
import signal
import subprocess
import sys

import gevent
import ollama
import pytest
import requests

from app.fakenode.store import library_manifest
from app.server import WORKER_SLOT
from tests.waiting import wait_until

LIBRARY = ["llama3.2", "qwen2.5:0.5b", "all-minilm", "m2", "base"]


def _layers(progress) -> dict[str, list]:
    out: dict[str, list] = {}
    for p in progress:
        if p.digest:
            out.setdefault(p.digest, []).append(p)
    return out


def _live_pulls(nodes) -> int:
    """Pull jobs still running inside these simulated nodes (generators not yet closed)."""
    sims = [n.node.sim for n in nodes]
    return sum(1 for o in gc.get_objects()
               if inspect.isgenerator(o) and o.__name__ == "pull_job" and o.gi_frame is not None
               and any(o.gi_frame.f_locals.get("sim") is sim for sim in sims))


# --- pull -------------------------------------------------------------------------------------

def test_pull_streams_per_layer_progress_summed_over_every_node_then_one_success(
        fake_node, appliance):
    nodes = [fake_node(["m"], library=LIBRARY, pull_bps=20e9) for _ in range(3)]
    lb = appliance(nodes)
    client = ollama.Client(host=lb.url)
    progress = list(client.pull("llama3.2", stream=True))
    assert progress[0].status == "pulling manifest"
    assert [p.status for p in progress[-3:]] == ["verifying sha256 digest", "writing manifest",
                                                 "success"]
    assert [p.status for p in progress].count("success") == 1
    layers = _layers(progress)
    manifest = library_manifest("llama3.2")
    assert set(layers) == {b.digest for b in manifest.blobs}
    for blob in manifest.blobs:
        lines = layers[blob.digest]
        assert {p.status for p in lines} == {f"pulling {blob.digest[7:19]}"}
        assert {p.total for p in lines} == {3 * blob.size}  # summed over the three nodes
        done = [p.completed for p in lines if p.completed is not None]
        assert done == sorted(done) and done[-1] == 3 * blob.size
    weights = layers[manifest.blobs[0].digest]
    assert len(weights) > 10  # progress as it goes, not one line at the end
    assert all(n.node.sim.has("llama3.2") for n in nodes)
    assert "llama3.2:latest" in {m.model for m in client.list().models}


def test_a_node_failing_mid_pull_is_named_while_the_others_finish(fake_node, appliance):
    fast = [fake_node(["m"], library=LIBRARY, pull_bps=40e9) for _ in range(2)]
    slow = fake_node(["m"], library=LIBRARY, pull_bps=2e9)  # ~1 s: it is still pulling
    lb = appliance([fast[0], slow, fast[1]], healthCheck={"intervalMs": 60_000})
    client = ollama.Client(host=lb.url)
    seen = []
    with pytest.raises(ollama.ResponseError) as err:
        for part in client.pull("llama3.2", stream=True):
            seen.append(part)
            if part.digest and part.completed and len(seen) == 3:
                slow.refuse()  # the box dies mid-pull
    assert err.value.error.startswith("n1: ")  # named, with why
    assert "done on n0, n2" in err.value.error
    assert "success" not in [p.status for p in seen]
    assert fast[0].node.sim.has("llama3.2") and fast[1].node.sim.has("llama3.2")
    assert not slow.node.sim.has("llama3.2")


def test_pull_with_stream_false_answers_one_object_and_refusals_as_ollama_does(
        fake_node, appliance):
    a, b = fake_node(["m"], library=LIBRARY), fake_node(["m"], library=LIBRARY)
    lb = appliance([a, b])
    client = ollama.Client(host=lb.url)
    assert client.pull("qwen2.5:0.5b").status == "success"
    assert a.node.sim.has("qwen2.5:0.5b") and b.node.sim.has("qwen2.5:0.5b")
    with pytest.raises(ollama.ResponseError) as missing:
        client.pull("not-in-the-library")
    assert missing.value.status_code == 500
    assert missing.value.error == "n0, n1: pull model manifest: file does not exist"
    r = requests.post(f"{lb.url}/api/pull", json={"model": "not-in-the-library"}, timeout=10)
    assert [json.loads(x) for x in r.text.splitlines()] == [
        {"status": "pulling manifest"},
        {"error": "n0, n1: pull model manifest: file does not exist"}]
    bad = requests.post(f"{lb.url}/api/pull", json={"model": "bad name!"}, timeout=5)
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid model name"})


def test_a_pull_is_bounded_by_silence_not_by_the_request_timeout(fake_node, appliance):
    steady = fake_node(["m"], library=LIBRARY, pull_bps=4e9)  # ~0.5 s, a line every ~15 ms
    stuck = fake_node(["m"], library=LIBRARY, pull_bps=1e6)  # a line per minute
    lb = appliance([steady, stuck], timeouts={"requestTimeoutMs": 100,
                                              "pullIdleTimeoutMs": 600})
    r = requests.post(f"{lb.url}/api/pull", json={"model": "llama3.2"}, timeout=20)
    last = json.loads(r.text.splitlines()[-1])
    assert last == {"error": "n1: no progress for 0.6 s during the stream (done on n0)"}
    assert steady.node.sim.has("llama3.2") and not stuck.node.sim.has("llama3.2")


def test_a_client_that_goes_away_cancels_the_pulls_it_started(fake_node, appliance):
    nodes = [fake_node(["m"], library=LIBRARY, pull_bps=1e9) for _ in range(2)]  # ~2 s each
    lb = appliance(nodes)
    r = requests.post(f"{lb.url}/api/pull", json={"model": "llama3.2"}, stream=True, timeout=10)
    lines = r.iter_lines()
    assert json.loads(next(lines)) == {"status": "pulling manifest"}
    next(lines)
    assert _live_pulls(nodes) == 2
    r.close()  # the client leaves
    assert wait_until(lambda: _live_pulls(nodes) == 0)
    assert not any(n.node.sim.has("llama3.2") for n in nodes)
    assert wait_until(lambda: lb.factory.management.in_flight == 0)
    text = lb.factory.metrics_registry.scrape()
    assert 'model_operations_total{operation="pull",outcome="cancelled"} 1.0' in text



def test_a_client_that_stops_waiting_for_a_whole_reply_cancels_the_pulls(fake_node, appliance):
    nodes = [fake_node(["m"], library=LIBRARY, pull_bps=1e9) for _ in range(2)]
    lb = appliance(nodes)
    with pytest.raises(requests.ReadTimeout):  # stream:false: nothing comes until the end
        requests.post(f"{lb.url}/api/pull", json={"model": "llama3.2", "stream": False},
                      timeout=(2, 0.3))
    assert wait_until(lambda: _live_pulls(nodes) == 0)
    assert not any(n.node.sim.has("llama3.2") for n in nodes)
    assert wait_until(lambda: lb.factory.management.in_flight == 0)


# --- create -----------------------------------------------------------------------------------

def test_create_from_a_model_no_node_has_pulls_it_on_every_node_first(fake_node, appliance):
    nodes = [fake_node(["m"], library=LIBRARY) for _ in range(2)]
    lb = appliance(nodes)
    client = ollama.Client(host=lb.url)
    statuses = [p.status for p in client.create(model="tiny", from_="qwen2.5:0.5b",
                                                system="be brief", stream=True)]
    assert statuses[0] == "pulling manifest"
    assert statuses.count("success") == 1 and statuses[-1] == "success"
    assert statuses[-2] == "writing manifest"
    for node in nodes:
        assert node.node.sim.has("qwen2.5:0.5b") and node.node.sim.has("tiny")
    assert client.create(model="tiny2", from_="qwen2.5:0.5b").status == "success"
    with pytest.raises(ollama.ResponseError, match="file does not exist"):
        client.create(model="other", from_="not-in-the-library")


def test_create_with_files_goes_to_the_nodes_that_have_the_blobs(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    data = b"GGUF" + bytes(range(256)) * 16
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    assert requests.post(f"{a.url}/api/blobs/{digest}", data=data, timeout=5).status_code == 201
    client = ollama.Client(host=lb.url)
    assert requests.head(f"{lb.url}/api/blobs/{digest}", timeout=5).status_code == 404
    assert client.create(model="local", files={"model.gguf": digest}).status == "success"
    assert a.node.sim.has("local") and not b.node.sim.has("local")
    unknown = "sha256:" + "0" * 64
    with pytest.raises(ollama.ResponseError, match="no such file") as absent:
        client.create(model="bad", files={"model.gguf": unknown})
    assert absent.value.status_code == 400


def test_create_from_a_model_some_nodes_have_stays_on_them(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["other"])
    lb = appliance([a, b])
    progress = list(ollama.Client(host=lb.url).create(model="m2", from_="m", system="x",
                                                      stream=True))
    assert progress[-1].status == "success"
    assert a.node.sim.has("m2") and not b.node.sim.has("m2")


def test_no_serving_node_means_503_and_empty_bodies_400(fake_node, appliance):
    a = fake_node(["m"])
    lb = appliance([a], node_overrides={0: {"enabled": False}})
    r = requests.post(f"{lb.url}/api/pull", json={"model": "x"}, timeout=5)
    assert (r.status_code, r.json()) == (503, {"error": "no node available"})
    assert requests.post(f"{lb.url}/api/pull", data=b"", timeout=5).json() == {
        "error": "missing request body"}


def test_management_calls_cannot_hold_the_hub(fake_node, appliance):
    """A pull in progress leaves the appliance free to answer anything else at once."""
    node = fake_node(["m"], library=LIBRARY, pull_bps=2e9)
    lb = appliance([node])
    stream = requests.post(f"{lb.url}/api/pull", json={"model": "llama3.2"}, stream=True,
                           timeout=10)
    first = next(stream.iter_lines())
    with gevent.Timeout(2):
        assert requests.get(f"{lb.url}/api/tags", timeout=2).ok
    stream.close()
    assert json.loads(first) == {"status": "pulling manifest"}


# --- blobs ------------------------------------------------------------------------------------

def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def test_blob_digest_errors_are_answered_as_ollama_does(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    unknown = _digest(b"never uploaded")
    assert requests.head(f"{lb.url}/api/blobs/{unknown}", timeout=5).status_code == 404
    assert requests.head(f"{lb.url}/api/blobs/sha256:xyz", timeout=5).status_code == 400
    bad = requests.post(f"{lb.url}/api/blobs/sha256:xyz", data=b"x", timeout=5)
    assert (bad.status_code, bad.json()) == (400, {"error": "invalid digest format"})
    data = b"GGUF weights"
    wrong = requests.post(f"{lb.url}/api/blobs/{unknown}", data=data, timeout=5)
    assert wrong.status_code == 400
    assert wrong.json() == {"error": f'digest mismatch, expected "{unknown}", got '
                                     f'"{_digest(data)}"'}
    assert unknown not in a.node.blobs and unknown not in b.node.blobs
    digest = _digest(data)
    assert requests.post(f"{lb.url}/api/blobs/{digest}", data=data, timeout=5).status_code == 201
    dashed = digest.replace("sha256:", "sha256-")
    assert requests.head(f"{lb.url}/api/blobs/{dashed}", timeout=5).status_code == 200
    assert requests.post(f"{lb.url}/api/blobs/{digest}", data=data, timeout=5).status_code == 200


def test_a_node_down_mid_blob_is_named_and_the_others_get_it(fake_node, appliance):
    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b], healthCheck={"intervalMs": 60_000})
    piece = bytes(range(256)) * 4096  # 1 MiB
    digest = _digest(b"GGUF" + piece * 64)

    def body():
        yield b"GGUF"
        for i in range(64):
            if i == 8:
                b.refuse()  # the box dies while its copy is on the way
            yield piece

    r = requests.post(f"{lb.url}/api/blobs/{digest}", data=body(), timeout=30)
    assert r.status_code == 502
    assert r.json()["error"].startswith(f"blob {digest} failed on 1 node: n1: ")
    assert r.json()["error"].endswith("; n0 have it")
    assert a.node.blobs[digest].size == 4 + 64 * len(piece)
    assert digest not in b.node.blobs


def test_a_client_that_leaves_mid_blob_leaves_no_partial_blob_anywhere(fake_node, appliance):
    from gevent import socket as gsocket

    a, b = fake_node(["m"]), fake_node(["m"])
    lb = appliance([a, b])
    digest = _digest(b"z" * 10_000_000)
    conn = gsocket.create_connection(("127.0.0.1", lb.port), timeout=5)
    conn.sendall(f"POST /api/blobs/{digest} HTTP/1.1\r\nHost: x\r\n"
                 "Content-Length: 10000000\r\n\r\n".encode() + b"z" * 1_000_000)
    assert wait_until(lambda: lb.factory.management.in_flight == 1)
    conn.close()  # gone, 9 MB short
    assert wait_until(lambda: lb.factory.management.in_flight == 0)
    assert wait_until(lambda: lb.factory.pipeline.in_flight == 0)
    assert digest not in a.node.blobs and digest not in b.node.blobs


def test_blob_size_limit_is_its_own_and_no_node_keeps_a_partial_blob(fake_node, appliance):
    a = fake_node(["m"])
    lb = appliance([a], server={"maxBlobBytes": 1024 * 1024, "maxBodyBytes": 1024})
    small = b"GGUF" + b"x" * 100_000  # over maxBodyBytes, under maxBlobBytes
    assert requests.post(f"{lb.url}/api/blobs/{_digest(small)}", data=small,
                         timeout=5).status_code == 201
    big = b"y" * (2 * 1024 * 1024)
    r = requests.post(f"{lb.url}/api/blobs/{_digest(big)}", data=big, timeout=5)
    assert r.status_code == 413 and "maxBlobBytes" in r.json()["error"]
    chunked = requests.post(f"{lb.url}/api/blobs/{_digest(big)}",
                            data=(big[i:i + 65536] for i in range(0, len(big), 65536)),
                            timeout=10)
    assert chunked.status_code == 413
    assert _digest(big) not in a.node.blobs


class _Appliance:
    """``python -m app CONFIG`` in a process of its own, so that its memory can be read."""

    def __init__(self, tmp_path, nodes) -> None:
        cfg = {"server": {"host": "127.0.0.1", "port": 0, "drainSeconds": 5},
               "nodes": [{"id": f"n{i}", "url": n.url} for i, n in enumerate(nodes)],
               "healthCheck": {"intervalMs": 200, "modelRefreshMs": 200}}
        path = tmp_path / "lb.yaml"
        path.write_text(json.dumps(cfg))  # JSON is YAML
        env = {k: v for k, v in os.environ.items() if k != "NOTIFY_SOCKET"}
        self.p = subprocess.Popen([sys.executable, "-m", "app", str(path)],
                                  stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=env)
        self.events: list[dict] = []
        with gevent.Timeout(20):
            while not any(e.get("event") == "started" for e in self.events):
                line = self.p.stderr.readline()
                assert line, f"appliance exited: {self.p.wait()}"
                self.events.append(json.loads(line))
        port = next(e for e in self.events if e.get("event") == "started")["port"]
        self.url = f"http://127.0.0.1:{port}"
        self._drain = gevent.spawn(self._read_rest)

    def _read_rest(self) -> None:
        for line in self.p.stderr:
            self.events.append(json.loads(line))

    def memory_kb(self, field: str) -> int:
        """``VmRSS`` (now) or ``VmHWM`` (the peak so far) of the process, in kB."""
        with open(f"/proc/{self.p.pid}/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.p.pid}/status")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
        try:
            return self.p.wait(timeout=15)
        finally:
            self._drain.join(timeout=5)
            self._drain.kill()


def test_a_200_mb_blob_streams_through_to_every_node_in_bounded_memory(fake_node, tmp_path):
    nodes = [fake_node(["m"]), fake_node(["m"])]
    lb = _Appliance(tmp_path, nodes)
    try:
        client = ollama.Client(host=lb.url)
        warm_up = tmp_path / "small.gguf"
        warm_up.write_bytes(b"GGUF" + b"w" * 300_000)
        client.create_blob(warm_up)  # the upload path is loaded and has run once
        before = lb.memory_kb("VmRSS")
        big = tmp_path / "big.gguf"
        with big.open("wb") as f:  # sparse: 200 MiB without writing them
            f.write(b"GGUF")
            f.truncate(200 * 1024 * 1024)
        digest = client.create_blob(big)
        grown_mb = (lb.memory_kb("VmHWM") - before) / 1024
        assert grown_mb < 50, f"the appliance's peak RSS grew by {grown_mb:.0f} MB"
        for node in nodes:
            assert node.node.blobs[digest].size == 200 * 1024 * 1024
        assert client.create(model="big", files={"big.gguf": digest}).status == "success"
        assert all(n.node.sim.has("big") for n in nodes)
    finally:
        assert lb.stop() == 0


# --- placement --------------------------------------------------------------------------------

def _loaded(node, model: str) -> bool:
    return any(r.name == f"{model}:latest" for r in node.node.sim.loaded.values())


def _models_doc(lb) -> dict:
    r = requests.get(f"{lb.url}/admin/models", timeout=5)
    assert r.status_code == 200
    return {m["name"]: m for m in r.json()["models"]} | {"_": r.json()}


def test_placement_pulls_onto_the_roomiest_nodes_and_keeps_the_model_warm(fake_node,
                                                                           appliance):
    full = fake_node(["llama3.2", "base"], library=LIBRARY)  # two models on disk
    half = fake_node(["llama3.2"], library=LIBRARY)
    empty = fake_node([], library=LIBRARY)
    lb = appliance([full, half, empty], models=[
        {"name": "m2", "replicas": 2, "warm": True, "keepAlive": "30m"}])
    assert wait_until(lambda: _loaded(half, "m2") and _loaded(empty, "m2"), timeout=15)
    assert not full.node.sim.has("m2")
    runner = next(r for r in empty.node.sim.loaded.values() if r.name == "m2:latest")
    assert runner.keep_alive_s == 1800  # warmed with the model's keepAlive
    assert wait_until(lambda: _models_doc(lb)["m2"]["state"] == "converged", timeout=5)
    doc = _models_doc(lb)["m2"]
    assert sorted(doc["targets"]) == sorted(doc["installed"]) == sorted(doc["loaded"]) == [
        "n1", "n2"]
    assert doc["want"] == "2 replicas" and doc["lastError"] is None
    assert {"model": "base:latest", "installed": ["n0"]} in _models_doc(lb)["_"]["unmanaged"]
    text = lb.factory.metrics_registry.scrape()
    assert 'placement_actions_total{action="pull",outcome="success"} 1.0' in text
    assert 'placement_actions_total{action="warm",outcome="success"} 1.0' in text


def test_placement_converges_after_a_node_joins(fake_node, appliance):
    from dataclasses import replace

    from pipeline.config import NodeConfig

    a, b = fake_node(["m2"], library=LIBRARY), fake_node([], library=LIBRARY)
    lb = appliance([a], models=[{"name": "m2"}])  # on every node
    assert wait_until(lambda: _models_doc(lb)["m2"]["state"] == "converged")
    cfg = lb.factory.config
    lb.factory.apply_config(replace(cfg, nodes=(*cfg.nodes, NodeConfig(id="n1", url=b.url))))
    assert wait_until(lambda: b.node.sim.has("m2"), timeout=10)
    assert wait_until(lambda: _models_doc(lb)["m2"]["installed"] == ["n0", "n1"])


def test_placement_converges_after_a_node_loses_the_model(fake_node, appliance):
    a, b, c = (fake_node(["m2"], library=LIBRARY), fake_node(["m2"], library=LIBRARY),
               fake_node([], library=LIBRARY))
    lb = appliance([a, b, c], models=[{"name": "m2", "replicas": 2}])
    assert wait_until(lambda: _models_doc(lb)["m2"]["state"] == "converged")
    b.node.sim.remove("m2")  # an operator deleted it on the box itself
    assert wait_until(lambda: sum(n.node.sim.has("m2") for n in (a, b, c)) == 2, timeout=10)
    holders = [f"n{i}" for i, n in enumerate((a, b, c)) if n.node.sim.has("m2")]
    assert wait_until(lambda: _models_doc(lb)["m2"]["installed"] == holders)
    assert wait_until(lambda: _models_doc(lb)["m2"]["state"] == "converged")
    text = lb.factory.metrics_registry.scrape()
    assert 'placement_actions_total{action="pull",outcome="success"} 1.0' in text


def test_placement_deletes_only_with_prune(fake_node, appliance):
    kept = [fake_node(["m2", "junk"]), fake_node(["m2", "junk"])]
    lb = appliance(kept, models=[{"name": "m2", "nodes": ["n0"]}])
    assert wait_until(lambda: _models_doc(lb)["m2"]["state"] == "converged")
    assert all(n.node.sim.has("junk") and n.node.sim.has("m2") for n in kept)
    assert _models_doc(lb)["m2"]["installed"] == ["n0", "n1"]  # an extra copy, left alone
    pruned = [fake_node(["m2", "junk"]), fake_node(["m2", "junk"])]
    lb2 = appliance(pruned, models=[{"name": "m2", "nodes": ["n0"]}],
                    placement={"prune": True})
    assert wait_until(lambda: not any(n.node.sim.has("junk") for n in pruned), timeout=10)
    assert wait_until(lambda: not pruned[1].node.sim.has("m2"))
    assert pruned[0].node.sim.has("m2")
    assert wait_until(lambda: _models_doc(lb2)["m2"]["state"] == "converged")


def test_placement_reports_a_failing_pull_and_backs_off(fake_node, appliance):
    a = fake_node([], library=LIBRARY)
    lb = appliance([a], models=[{"name": "not-in-the-library"}],
                   placement={"intervalMs": 60_000})
    assert wait_until(lambda: _models_doc(lb)["not-in-the-library"]["state"] == "failed")
    doc = _models_doc(lb)["not-in-the-library"]
    assert doc["lastError"] == "n0: pull model manifest: file does not exist"
    assert doc["failures"] == 1 and doc["plan"]["pull"] == ["n0"]


def test_a_client_pull_of_a_configured_model_goes_to_its_targets(fake_node, appliance):
    a, b = fake_node(["m"], library=LIBRARY), fake_node(["m"], library=LIBRARY)
    lb = appliance([a, b], models=[{"name": "m2", "nodes": ["n1"]}])
    assert ollama.Client(host=lb.url).pull("m2").status == "success"
    assert b.node.sim.has("m2") and not a.node.sim.has("m2")


def test_keep_alive_is_given_to_requests_that_carry_none(fake_node, appliance):
    a = fake_node(["m2"])
    lb = appliance([a], models=[{"name": "m2", "keepAlive": "30m"}, {"name": "m"}])
    placement = lb.factory.placement
    assert placement.keep_alive_for("M2:latest") == "30m"
    assert placement.keep_alive_for("m") is None and placement.keep_alive_for("x") is None
    body = b'{"model": "m2", "messages": []}'
    assert placement.with_keep_alive("/api/chat", body, "m2") == (
        b'{"keep_alive":"30m","model": "m2", "messages": []}')
    own = b'{"model": "m2", "keep_alive": 0}'
    assert placement.with_keep_alive("/api/generate", own, "m2") == own
    assert placement.with_keep_alive("/v1/chat/completions", body, "m2") == body
    assert placement.with_keep_alive("/api/chat", body, "m") == body
    # through the appliance: the node receives the model's keep_alive, the client's wins
    requests.post(f"{lb.url}/api/generate", json={"model": "m2", "prompt": "x",
                                                  "stream": False}, timeout=10)
    assert json.loads(a.stats.last_body)["keep_alive"] == "30m"
    requests.post(f"{lb.url}/api/generate", json={"model": "m2", "prompt": "x", "stream": False,
                                                  "keep_alive": "5m"}, timeout=10)
    assert json.loads(a.stats.last_body)["keep_alive"] == "5m"


def test_an_inactive_reconciler_plans_and_reports_but_does_not_act(fake_node, appliance,
                                                                   monkeypatch):
    a = fake_node([], library=LIBRARY)
    # a worker other than slot 0 starts inactive: its first pass (at start) must not act either
    monkeypatch.setenv(WORKER_SLOT, "1")
    lb = appliance([a], models=[{"name": "m2"}], placement={"intervalMs": 60_000})
    assert lb.factory.placement.active is False
    lb.factory.placement.apply_config(lb.factory.config)  # a pass now
    assert wait_until(lambda: _models_doc(lb)["m2"]["plan"]["pull"] == ["n0"])
    assert lb.factory.placement.reconcile().get("m2").pull == ("n0",)
    assert not a.node.sim.has("m2") and _models_doc(lb)["_"]["active"] is False
    lb.factory.placement.active = True
    lb.factory.placement.poke()
    assert wait_until(lambda: a.node.sim.has("m2"), timeout=10)
