"""API keys, scopes, model allow-lists, management without keys, proxy trust, reload, secrets.

Real clients through the appliance: the official ``ollama`` client with ``headers=``, the
``openai`` client with ``api_key=``, ``requests`` for the rest. Limits and usage are in
``test_security_limits.py``, the fuzz test in ``test_security_fuzz.py``.
"""

from __future__ import annotations

import io
import json
import logging
import socket
import subprocess
import sys

import gevent
import ollama
import openai
import pytest
import requests
import yaml
from conftest import assert_no_leaks, lb_config
from test_transport import ActivatedProc
from waiting import wait_until

from app.keys import hash_key, new_key
from app.logs import JsonFormatter
from app.server import OllamaLoadBalancerApplication
from app.web import create_app
from pipeline.config import parse_config
from pipeline.factory import PipelineFactory

INFER, MANAGER, ADMIN, ONLY_LLAMA = new_key(), new_key(), new_key(), new_key()


def entry(name: str, key: str, **extra):
    return {"name": name, "hash": hash_key(key), **extra}


KEYS = [entry("team-search", INFER), entry("ops", MANAGER, scopes=["inference", "manage"]),
        entry("root", ADMIN, scopes=["admin"]),
        entry("llama-only", ONLY_LLAMA, models=["llama3.2*"])]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


HEALTH_PATHS = {"/api/version", "/api/tags", "/api/ps"}  # the appliance's own checks


def traffic(node) -> dict[str, int]:
    """What clients' requests the node received: every path but the health checker's."""
    return {p: n for p, n in node.stats.by_path.items() if p not in HEALTH_PATHS}


@pytest.fixture
def logs():
    """Everything the appliance logs, as JSON lines."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("ollama_lb")
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.DEBUG)
    yield buf
    logger.setLevel(old)
    logger.removeHandler(handler)


@pytest.fixture
def keyed(fake_node, appliance):
    node = fake_node(["llama3.2", "all-minilm"])
    return appliance([node], security={"apiKeys": KEYS}), node


# --- the CLI ----------------------------------------------------------------------------------

def test_hash_key_prints_the_digest_and_new_key_a_random_key_with_its_entry():
    run = [sys.executable, "-m", "app"]
    out = subprocess.run([*run, "hash-key"], input="s3cret\n", capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == hash_key("s3cret")
    assert hash_key("s3cret").startswith("sha256:") and len(hash_key("s3cret")) == 71
    out = subprocess.run([*run, "new-key", "team-a", "--scopes", "inference,manage"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0
    key = next(line.split()[-1] for line in out.stdout.splitlines() if "olb_" in line)
    assert len(key) - len("olb_") >= 43  # 32 random bytes in URL-safe base64: 256 bits
    (cfg_entry,) = yaml.safe_load("\n".join(line for line in out.stdout.splitlines()
                                            if not line.startswith("#")))
    assert cfg_entry == {"name": "team-a", "hash": hash_key(key),
                         "scopes": ["inference", "manage"]}
    parse_config({"security": {"apiKeys": [cfg_entry]}})  # the entry is a valid config
    again = subprocess.run([*run, "new-key", "team-a"], capture_output=True, text=True,
                           timeout=30)
    assert key not in again.stdout  # fresh every time
    bad = subprocess.run([*run, "new-key", "no spaces"], capture_output=True, text=True,
                         timeout=30)
    assert bad.returncode == 2 and "name" in bad.stderr


# --- keys with real clients -------------------------------------------------------------------

def test_ollama_client_with_a_valid_key_works_and_without_one_gets_401(keyed):
    lb, node = keyed
    good = ollama.Client(host=lb.url, headers=bearer(INFER))
    assert good.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}]).done
    assert [c.done for c in good.generate(model="llama3.2", prompt="x", stream=True)][-1]
    before = traffic(node)
    for client in (ollama.Client(host=lb.url), ollama.Client(host=lb.url,
                                                             headers=bearer("olb_wrong"))):
        with pytest.raises(ollama.ResponseError) as err:
            client.chat(model="llama3.2", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 401 and err.value.error == "unauthorized"
        with pytest.raises(ollama.ResponseError):
            client.list()
    assert traffic(node) == before  # nothing reached the node
    r = requests.post(f"{lb.url}/api/chat", json={"model": "llama3.2"}, timeout=5,
                      headers={"Authorization": "Basic dXNlcjpwYXNz"})
    assert r.status_code == 401 and r.json() == {"error": "unauthorized"}
    assert r.headers["WWW-Authenticate"].startswith("Bearer")


def test_root_and_health_need_no_key_but_everything_else_does(keyed):
    lb, _ = keyed
    for path in ("/", "/health", "/health/live", "/health/ready"):
        assert requests.get(f"{lb.url}{path}", timeout=5).status_code == 200, path
    assert requests.head(f"{lb.url}/", timeout=5).status_code == 200
    for method, path in (("GET", "/api/tags"), ("GET", "/api/version"), ("GET", "/api/ps"),
                         ("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/admin/nodes"),
                         ("GET", "/no/such/path"), ("POST", "/"), ("GET", "/api/tags/")):
        r = requests.request(method, f"{lb.url}{path}", timeout=5)
        assert r.status_code == 401, (method, path)
    assert requests.get(f"{lb.url}/no/such/path", headers=bearer(INFER),
                        timeout=5).status_code == 404


def test_openai_client_with_api_key_works_and_a_wrong_one_raises_authentication_error(keyed):
    lb, node = keyed
    good = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=INFER, max_retries=0)
    reply = good.chat.completions.create(model="llama3.2",
                                         messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content
    assert [m.id for m in good.models.list()]
    bad = openai.OpenAI(base_url=f"{lb.url}/v1", api_key="olb_nope", max_retries=0)
    before = traffic(node)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="llama3.2", messages=[{"role": "user",
                                                                 "content": "hi"}])
    assert err.value.status_code == 401
    assert err.value.body == {"message": "unauthorized", "type": "invalid_request_error",
                              "param": None, "code": "invalid_api_key"}
    assert traffic(node) == before


def test_anthropic_messages_get_anthropic_shaped_401(keyed):
    lb, _ = keyed
    r = requests.post(f"{lb.url}/v1/messages", json={"model": "llama3.2", "max_tokens": 5,
                                                     "messages": []}, timeout=5)
    assert r.status_code == 401
    assert r.json()["type"] == "error"
    assert r.json()["error"] == {"type": "authentication_error", "message": "unauthorized"}
    ok = requests.post(f"{lb.url}/v1/messages", headers={"x-api-key": INFER}, timeout=5,
                       json={"model": "llama3.2", "max_tokens": 5,
                             "messages": [{"role": "user", "content": "hi"}]})
    assert ok.status_code == 200 and ok.json()["type"] == "message"


# --- scopes and models --------------------------------------------------------------------------

def test_a_key_without_the_scope_gets_403_naming_it(keyed):
    lb, node = keyed
    client = ollama.Client(host=lb.url, headers=bearer(INFER))
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3.2", stream=False)
    assert err.value.status_code == 403 and "'manage'" in err.value.error
    assert "team-search" in err.value.error
    with pytest.raises(ollama.ResponseError) as err:
        client.delete("llama3.2")
    assert err.value.status_code == 403
    assert "/api/delete" not in node.stats.by_path and "/api/pull" not in node.stats.by_path
    r = requests.get(f"{lb.url}/admin/nodes", headers=bearer(INFER), timeout=5)
    assert r.status_code == 403 and "'admin'" in r.json()["error"]
    assert requests.get(f"{lb.url}/metrics", headers=bearer(INFER), timeout=5
                        ).status_code == 403
    # the admin-only key may administer but not infer
    assert requests.get(f"{lb.url}/admin/nodes", headers=bearer(ADMIN), timeout=5).ok
    assert requests.get(f"{lb.url}/metrics", headers=bearer(ADMIN), timeout=5).ok
    r = requests.post(f"{lb.url}/api/generate", json={"model": "llama3.2", "prompt": "x"},
                      headers=bearer(ADMIN), timeout=5)
    assert r.status_code == 403 and "'inference'" in r.json()["error"]
    ops = ollama.Client(host=lb.url, headers=bearer(MANAGER))
    assert ops.pull("llama3.2", stream=False).status == "success"
    assert ops.copy("llama3.2", "mine") is not None and ops.delete("mine") is not None
    assert node.stats.by_path.get("/api/pull") == 1


def test_the_admin_token_still_works_with_keys_and_metrics_can_be_public(fake_node, appliance):
    lb = appliance([fake_node(["m"])], admin={"token": "tok"}, metrics={"public": True},
                   security={"apiKeys": KEYS})
    assert requests.get(f"{lb.url}/admin/nodes", headers=bearer("tok"), timeout=5).ok
    assert requests.get(f"{lb.url}/admin/nodes", headers=bearer(ADMIN), timeout=5).ok
    assert requests.get(f"{lb.url}/admin/nodes", timeout=5).status_code == 401
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                      headers=bearer("tok"), timeout=5)
    assert r.status_code == 401  # the admin token is no inference key
    assert requests.get(f"{lb.url}/metrics", timeout=5).ok  # public


def test_a_model_allow_list_refuses_other_models_before_any_node_sees_them(keyed):
    lb, node = keyed
    client = ollama.Client(host=lb.url, headers=bearer(ONLY_LLAMA))
    assert client.generate(model="llama3.2:latest", prompt="x").done
    assert client.generate(model="registry.ollama.ai/library/LLAMA3.2", prompt="x").done
    before = traffic(node)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="all-minilm", input="x")
    assert err.value.status_code == 403 and "'all-minilm'" in err.value.error
    with pytest.raises(ollama.ResponseError):
        client.show("all-minilm")
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=ONLY_LLAMA, max_retries=0)
    with pytest.raises(openai.PermissionDeniedError):
        oa.embeddings.create(model="all-minilm", input="x")
    with pytest.raises(openai.PermissionDeniedError):
        oa.models.retrieve("all-minilm")
    assert traffic(node) == before
    # listings show only what the key may use
    assert [m.model for m in client.list().models] == ["llama3.2:latest"]
    assert [m.id for m in oa.models.list()] == ["llama3.2:latest"]
    every = ollama.Client(host=lb.url, headers=bearer(INFER)).list().models
    assert len(every) == 2


# --- without keys -------------------------------------------------------------------------------

def test_without_keys_management_answers_loopback_only_and_never_through_a_proxy(fake_node,
                                                                                appliance):
    node = fake_node(["m"])
    lb = appliance([node])
    assert ollama.Client(host=lb.url).generate(model="m", prompt="x").done  # inference: open
    assert ollama.Client(host=lb.url).copy("m", "m2") is not None  # loopback: manage allowed
    proxied = ollama.Client(host=lb.url, headers={"X-Forwarded-For": "127.0.0.1"})
    with pytest.raises(ollama.ResponseError) as err:
        proxied.delete("m2")
    assert err.value.status_code == 403 and "security.openManagement" in err.value.error
    for header in ({"Forwarded": "for=127.0.0.1"}, {"X-Real-IP": "127.0.0.1"}):
        r = requests.post(f"{lb.url}/api/pull", json={"model": "m"}, headers=header, timeout=5)
        assert r.status_code == 403
        assert requests.get(f"{lb.url}/admin/nodes", headers=header,
                            timeout=5).status_code == 403
    assert "/api/delete" not in node.stats.by_path and "/api/pull" not in node.stats.by_path
    assert ollama.Client(host=lb.url, headers={"X-Forwarded-For": "192.0.2.9"}).generate(
        model="m", prompt="x").done  # inference stays open to everyone


def access_lines(logs) -> list[dict]:
    """The access log's lines (logger ``ollama_lb.access``), parsed."""
    lines = [json.loads(x) for x in logs.getvalue().splitlines()]
    return [x for x in lines if x["logger"] == "ollama_lb.access"]


def test_the_access_line_names_the_key_that_made_the_request_never_the_key(
        fake_node, appliance, logs):
    node = fake_node(["llama3.2"])
    lb = appliance([node], security={"apiKeys": KEYS})
    client = ollama.Client(host=lb.url, headers=bearer(INFER))
    client.generate(model="llama3.2", prompt="x")  # the fast lane
    assert [c.done for c in client.chat(model="llama3.2", stream=True,
                                        messages=[{"role": "user", "content": "hi"}])][-1]
    requests.post(f"{lb.url}/api/embed", json={"model": "llama3.2", "input": "x"}, timeout=5,
                  headers={**bearer(MANAGER), "Origin": "http://a.example"})  # through Flask
    ollama.Client(host=lb.url, headers=bearer(MANAGER)).copy("llama3.2", "copied")  # manage
    assert wait_until(lambda: len(access_lines(logs)) == 4), access_lines(logs)
    assert [(x["path"], x.get("key", "absent")) for x in access_lines(logs)] == [
        ("/api/generate", "team-search"), ("/api/chat", "team-search"),
        ("/api/embed", "ops"), ("/api/copy", "ops")]
    assert INFER not in logs.getvalue() and MANAGER not in logs.getvalue()
    open_lb = appliance([node])  # without keys: the line says so
    ollama.Client(host=open_lb.url, headers=bearer("node-credential")).generate(
        model="llama3.2", prompt="x")
    assert wait_until(lambda: len(access_lines(logs)) == 5)
    assert access_lines(logs)[-1]["key"] is None
    assert "node-credential" not in logs.getvalue()


def test_trusted_proxies_pass_the_forwarded_client_on(fake_node, appliance, logs):
    lb = appliance([fake_node(["m"])], server={"trustedProxies": ["127.0.0.0/8"]})
    ollama.Client(host=lb.url, headers={"X-Forwarded-For": "203.0.113.5, 127.0.0.2"}
                  ).generate(model="m", prompt="x")
    access = [json.loads(x) for x in logs.getvalue().splitlines() if '"request"' in x]
    assert access[-1]["client"] == "203.0.113.5"  # logs see the client, not the proxy
    far = {"X-Forwarded-For": "192.0.2.9, 127.0.0.1"}
    r = requests.post(f"{lb.url}/api/copy", json={"source": "m", "destination": "x"},
                      headers=far, timeout=5)
    assert r.status_code == 403  # the client behind the proxies is not local
    near = {"X-Forwarded-For": "127.0.0.1"}
    assert requests.post(f"{lb.url}/api/copy", json={"source": "m", "destination": "x"},
                         headers=near, timeout=5).status_code == 200
    assert requests.get(f"{lb.url}/admin/nodes", headers=near, timeout=5).ok
    assert requests.get(f"{lb.url}/admin/nodes", headers={"Forwarded": 'for="[2001:db8::1]"'},
                        timeout=5).status_code == 403


def test_open_management_lets_every_client_manage(fake_node, appliance):
    lb = appliance([fake_node(["m"])], security={"openManagement": True})
    r = requests.post(f"{lb.url}/api/copy", json={"source": "m", "destination": "x"},
                      headers={"X-Forwarded-For": "192.0.2.9"}, timeout=5)
    assert r.status_code == 200


def test_admin_and_manage_refuse_clients_beyond_loopback_in_process(fake_node):
    cfg = parse_config(lb_config([fake_node(["m"])]))
    with PipelineFactory(cfg).start(health_checks=False) as factory:
        client = create_app(factory).test_client()
        far = {"REMOTE_ADDR": "192.0.2.7"}
        r = client.post("/api/pull", json={"model": "m"}, environ_base=far)
        assert r.status_code == 403 and "security.apiKeys" in r.get_json()["error"]
        assert client.get("/admin/nodes", environ_base=far).status_code == 403
        mapped = {"REMOTE_ADDR": "::ffff:127.0.0.1"}
        assert client.get("/admin/nodes", environ_base=mapped).status_code == 200


def test_the_start_log_says_what_is_open_beyond_loopback(fake_node, logs):
    for security, words in (({}, "NO API KEYS"), ({"openManagement": True}, "OPEN"),
                            ({"apiKeys": KEYS}, "API keys required")):
        cfg = parse_config({**lb_config([fake_node(["m"])]), "security": security,
                            "server": {"host": "0.0.0.0", "port": 0}})
        OllamaLoadBalancerApplication(cfg, watch=False, health_checks=False).start().shutdown(
            drain_s=0)  # bound on 0.0.0.0, never sent to
        line = exposure_line(logs)
        assert words in line["msg"] and line["level"] == "WARNING", line


def exposure_line(logs) -> dict:
    """The last start-up exposure line the appliance logged."""
    return [x for x in map(json.loads, logs.getvalue().splitlines())
            if x.get("event") == "exposure"][-1]


def test_the_start_log_judges_the_address_it_listens_on_not_server_host(fake_node, logs):
    """``ollama-lb --host 0.0.0.0`` with a config that says 127.0.0.1 listens beyond loopback:
    the warning must be there (and no false alarm the other way round)."""
    node = fake_node(["m"])
    for config_host, host, level, words in (("127.0.0.1", "0.0.0.0", "WARNING", "NO API KEYS"),
                                            ("0.0.0.0", "127.0.0.1", "INFO", "loopback only")):
        cfg = parse_config(lb_config([node], server={"host": config_host}))
        app = OllamaLoadBalancerApplication(cfg, host=host, watch=False,
                                            health_checks=False).start()
        try:
            line = exposure_line(logs)
            assert (line["level"], line["host"]) == (level, host) and words in line["msg"], line
            assert requests.get(f"http://127.0.0.1:{app.port}/health", timeout=5).ok
        finally:
            app.shutdown(drain_s=0)


def test_the_start_log_judges_a_systemd_socket_by_where_it_listens(fake_node, tmp_path):
    """A socket unit listening on every address, a config that says 127.0.0.1: the warning."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"server": {"host": "127.0.0.1", "port": 0},
                                      "nodes": [{"id": "n0", "url": fake_node(["m"]).url}]}))
    with socket.socket() as listener:
        listener.bind(("0.0.0.0", 0))  # only bound: the test sends nothing to it
        listener.listen(16)
        proc = ActivatedProc(config, listener)
        try:
            line = proc.wait_for("exposure")
            assert (line["level"], line["host"]) == ("WARNING", "0.0.0.0"), line
            assert "NO API KEYS" in line["msg"]
        finally:
            assert proc.stop() == 0


# --- reload -----------------------------------------------------------------------------------

def test_keys_and_limits_reload_and_a_removed_key_stops_at_once(fake_node, tmp_path):
    node = fake_node(["m"], decode_tps=20, tokens=40)  # a 2 s stream
    path = tmp_path / "c.yaml"
    extra = new_key()

    def write(keys) -> None:
        path.write_text(yaml.safe_dump(lb_config([node], security={"apiKeys": keys})))

    write(KEYS)
    app = OllamaLoadBalancerApplication(str(path), watch=False).start()
    try:
        client = ollama.Client(host=app.url, headers=bearer(INFER))
        stream = iter(client.generate(model="m", prompt="x", stream=True))
        assert not next(stream).done
        write([*(k for k in KEYS if k["name"] not in ("team-search", "ops")), entry("new", extra),
               entry("ops", MANAGER, scopes=["inference"], requestsPerMinute=1)])
        assert app.reload_state.reload("test")["result"] == "applied"
        with pytest.raises(ollama.ResponseError) as err:
            client.generate(model="m", prompt="y")
        assert err.value.status_code == 401  # removed: refused at once
        with pytest.raises(ollama.ResponseError) as err:
            list(stream)
        assert "revoked" in err.value.error  # and its live stream is cut with an error line
        assert ollama.Client(host=app.url, headers=bearer(extra)).generate(
            model="m", prompt="x", options={"num_predict": 1}).done  # added: works at once
        ops = ollama.Client(host=app.url, headers=bearer(MANAGER))
        assert ops.generate(model="m", prompt="x", options={"num_predict": 1}).done
        with pytest.raises(ollama.ResponseError) as err:
            ops.generate(model="m", prompt="x")
        assert err.value.status_code == 429  # its new limit applies
        with pytest.raises(ollama.ResponseError) as err:
            ops.pull("m", stream=False)
        assert err.value.status_code == 403  # and its narrower scopes
        assert_no_leaks(app)
    finally:
        app.shutdown(drain_s=0)


def test_a_whole_reply_in_flight_when_its_key_is_removed_arrives_whole(fake_node, tmp_path):
    """A removed key's new requests are refused and its streams cut; a whole (non-streamed)
    reply the node is already making is delivered whole, through the fast lane and through
    Flask (a request with an ``Origin``), never emptied under its ``Content-Length``."""
    node = fake_node(["m"], decode_tps=20, tokens=20)  # a 1 s reply
    path = tmp_path / "c.yaml"
    app = None

    def keys(listed) -> None:
        path.write_text(yaml.safe_dump(lb_config([node], security={"apiKeys": listed})))
        if app is not None:
            assert app.reload_state.reload("test")["result"] == "applied"

    keys(KEYS)
    app = OllamaLoadBalancerApplication(str(path), watch=False).start()
    try:
        for origin in ({}, {"Origin": "http://localhost"}):
            seen = traffic(node).get("/api/generate", 0)
            client = ollama.Client(host=app.url, headers={**bearer(INFER), **origin})
            pending = gevent.spawn(client.generate, model="m", prompt="x")
            assert wait_until(lambda s=seen: traffic(node).get("/api/generate", 0) == s + 1)
            keys([k for k in KEYS if k["name"] != "team-search"])
            with pytest.raises(ollama.ResponseError) as err:
                client.generate(model="m", prompt="y")
            assert err.value.status_code == 401  # the key itself stopped at once
            assert not pending.ready()  # ... while the node was still making the reply
            reply = pending.get(timeout=30)
            assert reply.done and reply.eval_count == 20 and len(reply.response) > 0, origin
            keys(KEYS)
        assert_no_leaks(app)
    finally:
        app.shutdown(drain_s=0)


# --- secrets ----------------------------------------------------------------------------------

def record_headers(node) -> list[dict[str, str]]:
    """The HTTP headers of every request the node receives."""
    seen: list[dict[str, str]] = []
    inner = node._server.application

    def app(environ, start_response):
        seen.append({"PATH": environ["PATH_INFO"],
                     **{k: v for k, v in environ.items() if k.startswith("HTTP_")}})
        return inner(environ, start_response)

    node._server.application = app
    return seen


def test_keys_never_reach_nodes_logs_config_metrics_or_errors(fake_node, appliance, logs):
    node = fake_node(["llama3.2"])
    seen = record_headers(node)
    lb = appliance([node], security={"apiKeys": KEYS}, logging={"level": "DEBUG"})
    ollama.Client(host=lb.url, headers=bearer(INFER)).generate(model="llama3.2",
                                                               prompt="TOP SECRET PROMPT")
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=INFER, max_retries=0)
    list(oa.chat.completions.create(model="llama3.2", stream=True,
                                    messages=[{"role": "user", "content": "TOP SECRET"}]))
    requests.post(f"{lb.url}/api/embed", json={"model": "llama3.2", "input": "x"},
                  headers={"x-api-key": INFER}, timeout=5)
    bodies = [requests.post(f"{lb.url}/api/chat", json={"model": "llama3.2"}, timeout=5,
                            headers=bearer(INFER + "x")).text,
              requests.post(f"{lb.url}/api/pull", json={"model": "llama3.2"}, timeout=5,
                            headers=bearer(INFER)).text,
              requests.get(f"{lb.url}/admin/config", headers=bearer(ADMIN), timeout=5).text,
              requests.get(f"{lb.url}/metrics", headers=bearer(ADMIN), timeout=5).text]
    config = json.loads(bodies[2])["config"]["security"]["apiKeys"]
    assert [k["hash"] for k in config] == ["***"] * len(KEYS)
    paths = [h["PATH"] for h in seen if h["PATH"] not in HEALTH_PATHS]
    assert paths == ["/api/generate", "/v1/chat/completions", "/api/embed"]  # these went on
    assert all("HTTP_AUTHORIZATION" not in h and "HTTP_X_API_KEY" not in h for h in seen)
    text = logs.getvalue() + "".join(bodies)
    for secret in (INFER, ADMIN, *(k["hash"][7:] for k in KEYS)):
        assert secret not in text
    assert "TOP SECRET" not in logs.getvalue()
    assert '"key": "team-search"' in logs.getvalue()  # the name is what logs show


def test_without_keys_the_authorization_header_still_goes_to_the_node(fake_node, appliance):
    node = fake_node(["m"])
    seen = record_headers(node)
    lb = appliance([node])
    ollama.Client(host=lb.url, headers=bearer("node-credential")).generate(model="m",
                                                                          prompt="x")
    assert {"Bearer node-credential"} == {h.get("HTTP_AUTHORIZATION") for h in seen
                                          if "HTTP_AUTHORIZATION" in h}
