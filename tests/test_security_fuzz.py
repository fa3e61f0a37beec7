"""A bounded fuzz test: random methods, paths, headers and bodies at the running appliance with
API keys on, over real sockets.

Every request must get a well-formed HTTP answer (never a 500), and the simulated node must
receive only what the one valid credential in play may do: inference, for models its
allow-list names, never management; a request without that credential reaches no node at all.
Afterwards the appliance still answers, and no slot, admission, in-flight place or client
connection is left held (the fixture's teardown checks the pipeline's side).
"""

from __future__ import annotations

import http.client
import io
import json

from conftest import assert_no_leaks
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from waiting import wait_until

from app.keys import canonical_pattern, hash_key, new_key
from pipeline.modelname import canonical

KEY, ROOT = new_key(), new_key()
ALLOWED = canonical_pattern("llama3.2*")
HEALTH_PATHS = {"/api/version", "/api/tags", "/api/ps"}
MANAGE = ("/api/pull", "/api/push", "/api/create", "/api/copy", "/api/delete", "/api/blobs")
PATHS = ["/", "/health", "/metrics", "/admin/nodes", "/admin/usage", "/admin/reload",
         "/admin/config", "/api/generate", "/api/chat", "/api/embed", "/api/embeddings",
         "/api/show", "/api/tags", "/api/ps", "/api/version", "/api/pull", "/api/push",
         "/api/create", "/api/copy", "/api/delete", "/api/blobs/sha256:" + "a" * 64,
         "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models",
         "/v1/models/llama3.2", "/v1/models/all-minilm", "/v1/messages", "/v1/responses",
         "/v1/inference", "/api/chat/", "//api//pull", "/admin/../api/pull", "/api/pull/",
         "/ADMIN/nodes", "/api/generate?x=1", "/%61pi/pull"]
SAFE = st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=40)
URL_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789-._~%/:?=&"
CREDENTIALS = st.sampled_from([f"Bearer {KEY}", f"bearer  {KEY} ", "Bearer wrong", "Basic a",
                               "Bearer", "", f"Bearer {ROOT}", KEY, f"Token {KEY}"]) | SAFE
MODELS = st.sampled_from(["llama3.2", "llama3.2:1b", "LLAMA3.2:latest", "all-minilm",
                          "registry.ollama.ai/library/all-minilm", "", "../x", "llama3.2*"])


def valid(headers: dict[str, str]) -> bool:
    """Whether the request carries the one key that may reach the node (the gate's rule)."""
    if "Authorization" in headers:
        scheme, _, value = headers["Authorization"].strip().partition(" ")
        return scheme.lower() == "bearer" and value.strip() == KEY
    return headers.get("X-Api-Key") == KEY


@st.composite
def bodies(draw) -> bytes:
    kind = draw(st.sampled_from(["empty", "json", "junk", "deep", "manage"]))
    if kind == "empty":
        return b""
    if kind == "junk":
        return draw(st.binary(max_size=512))
    if kind == "deep":
        return b"[" * draw(st.integers(1, 3000))
    doc = {"model": draw(MODELS | st.integers() | st.none()),
           "stream": draw(st.booleans() | st.none() | st.just("yes"))}
    if kind == "manage":
        doc.update(source=draw(MODELS), destination=draw(MODELS), name=draw(MODELS))
    if draw(st.booleans()):
        doc["messages"] = [{"role": "user", "content": draw(st.text(max_size=30))}]
        doc["prompt"] = draw(st.text(max_size=30))
    if draw(st.booleans()):
        doc["keep_alive"] = 0
    return json.dumps(doc).encode()


ROUTED = ["/api/generate", "/api/chat", "/api/embed", "/api/show", "/v1/chat/completions",
          "/v1/completions", "/v1/embeddings", "/v1/messages", "/api/push", "/api/pull",
          "/api/copy", "/api/delete", "/api/create"]


@st.composite
def fuzz_requests(draw) -> tuple[str, str, dict[str, str], bytes]:
    """Half plausible (POST, a model-routed or manage path, often the valid key), half wild."""
    if draw(st.booleans()):
        headers = {"Authorization": draw(st.sampled_from([f"Bearer {KEY}"] * 3 + ["Bearer x"]))}
        doc = {"model": draw(st.sampled_from(["llama3.2", "llama3.2:latest"]) | MODELS),
               "stream": draw(st.booleans()), "prompt": "hi",
               "messages": [{"role": "user", "content": "hi"}], "input": "hi",
               "max_tokens": 3, "source": draw(MODELS), "destination": "copy"}
        return "POST", draw(st.sampled_from(ROUTED)), headers, json.dumps(doc).encode()
    method = draw(st.sampled_from(["GET", "POST", "PUT", "DELETE", "HEAD", "PATCH", "OPTIONS",
                                   "FOO"]))
    path = draw(st.sampled_from(PATHS) | st.text(alphabet=URL_CHARS, max_size=30).map(
        lambda p: "/" + p))
    headers = {}
    for name, values in (("Authorization", CREDENTIALS), ("X-Api-Key", CREDENTIALS),
                         ("X-Forwarded-For", st.sampled_from(["127.0.0.1", "1.2.3.4, ::1"])),
                         ("Forwarded", st.sampled_from(['for="[::1]"', "for=unknown"])),
                         ("Origin", st.sampled_from(["http://localhost:3000", "http://evil"])),
                         ("Content-Type", SAFE), ("X-Request-ID", SAFE), ("Accept", SAFE)):
        if draw(st.booleans()):
            headers[name] = draw(values)
    return method, path, headers, draw(bodies())


def recorder(node) -> list[tuple[str, str]]:
    """(path, model) of every request the node receives (the body is read and put back)."""
    seen: list[tuple[str, str]] = []
    inner = node._server.application

    def app(environ, start_response):
        body = environ["wsgi.input"].read()
        environ["wsgi.input"] = io.BytesIO(body)
        try:
            model = json.loads(body).get("model") or ""
        except (ValueError, AttributeError):
            model = ""
        path = environ["PATH_INFO"]
        if path.startswith("/v1/models/"):
            model = path[len("/v1/models/"):]
        seen.append((path, model if isinstance(model, str) else repr(model)))
        return inner(environ, start_response)

    node._server.application = app
    return seen


def send(url_port: int, method: str, path: str, headers: dict[str, str], body: bytes) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", url_port, timeout=15)
    try:
        conn.request(method, path, body=body or None, headers=headers)
        resp = conn.getresponse()
        resp.read()
        assert resp.version in (10, 11) and resp.reason is not None
        return resp.status
    finally:
        conn.close()


def test_random_requests_get_answers_and_reach_nodes_only_as_the_key_allows(fake_node,
                                                                            appliance):
    node = fake_node(["llama3.2", "all-minilm"])
    seen = recorder(node)
    lb = appliance([node], security={"apiKeys": [
        {"name": "fuzz", "hash": hash_key(KEY), "models": ["llama3.2*"],
         "requestsPerMinute": 100_000, "maxConcurrent": 4, "tokensPerDay": 10**9},
        {"name": "root", "hash": hash_key(ROOT), "scopes": ["admin"]}]})
    statuses: list[int] = []

    @settings(max_examples=300, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(fuzz_requests())
    def one(request: tuple[str, str, dict[str, str], bytes]) -> None:
        method, path, headers, body = request
        before = len(seen)
        status = send(lb.port, method, path, headers, body)
        statuses.append(status)
        assert 100 <= status < 600 and status != 500, (status, request)
        reached = [(p, m) for p, m in seen[before:] if p not in HEALTH_PATHS]
        if not valid(headers):
            assert not reached, request  # no valid key: no node hears of it
        assert len(reached) <= 1, request
        for p, model in reached:
            assert not p.startswith(MANAGE), request
            assert model == "" or canonical(model).startswith(ALLOWED[:-1]), request

    one()
    assert len(set(statuses)) > 5  # the fuzz reached many different answers
    forwarded = [p for p, _ in seen if p not in HEALTH_PATHS]
    assert len(forwarded) > 20 and statuses.count(403) > 10  # both sides of the line tried
    assert send(lb.port, "GET", "/health/live", {}, b"") == 200  # still up
    assert wait_until(lambda: not any(not h.idle for h in lb.server.connections))
    usage = json.loads(http_get(lb.port, "/admin/usage", ROOT))
    assert usage["keys"]["fuzz"]["inFlight"] == 0
    assert_no_leaks(lb)


def http_get(port: int, path: str, key: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {key}"})
        return conn.getresponse().read()
    finally:
        conn.close()
