"""Limits and usage per key (and per client address without keys), through the appliance.

Requests per minute, requests in flight and tokens per day answer 429 with ``Retry-After`` in
each API's shape before anything reaches a node; tokens are charged from what the replies
report; usage shows in ``GET /admin/usage``, in per-key series, and survives a restart in the
usage file.
"""

from __future__ import annotations

import json
import sqlite3

import ollama
import openai
import pytest
import requests
from waiting import wait_until

from app.keys import hash_key, new_key
from app.server import OllamaLoadBalancerApplication
from pipeline.config import parse_config

TEAM, ROOT = new_key(), new_key()
HEALTH_PATHS = {"/api/version", "/api/tags", "/api/ps"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def keys(**limits) -> dict:
    return {"apiKeys": [{"name": "team", "hash": hash_key(TEAM), **limits},
                        {"name": "root", "hash": hash_key(ROOT), "scopes": ["admin"]}]}


def traffic(node) -> dict[str, int]:
    return {p: n for p, n in node.stats.by_path.items() if p not in HEALTH_PATHS}


def usage(lb, name: str = "team") -> dict:
    doc = requests.get(f"{lb.url}/admin/usage", headers=bearer(ROOT), timeout=5).json()
    return doc["keys"][name]


def test_requests_per_minute_gives_429_with_retry_after_in_each_api_shape(fake_node,
                                                                          appliance):
    node = fake_node(["m"])
    lb = appliance([node], security=keys(requestsPerMinute=2))
    client = ollama.Client(host=lb.url, headers=bearer(TEAM))
    assert client.generate(model="m", prompt="x").done
    assert client.generate(model="m", prompt="x").done
    before = traffic(node)
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "x"},
                      headers=bearer(TEAM), timeout=5)
    assert r.status_code == 429 and "2 requests per minute" in r.json()["error"]
    assert 1 <= int(r.headers["Retry-After"]) <= 30  # a token comes back every 30 s
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=TEAM, max_retries=0)
    with pytest.raises(openai.RateLimitError) as err:
        oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    assert err.value.body["code"] == "rate_limit_exceeded"
    assert traffic(node) == before  # refused before reaching the node
    assert usage(lb)["today"]["requests"] == 2


def test_max_concurrent_counts_requests_in_flight_and_gives_places_back(fake_node, appliance):
    node = fake_node(["m"], decode_tps=20, tokens=10)  # a 0.5 s stream
    lb = appliance([node], security=keys(maxConcurrent=1))
    client = ollama.Client(host=lb.url, headers=bearer(TEAM))
    stream = iter(client.generate(model="m", prompt="x", stream=True))
    assert not next(stream).done
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m", prompt="y")
    assert err.value.status_code == 429 and "in flight" in err.value.error
    assert list(stream)[-1].done
    assert wait_until(lambda: usage(lb)["inFlight"] == 0)
    assert client.generate(model="m", prompt="y").done
    # a client that leaves mid-stream gives its place back too
    r = requests.post(f"{lb.url}/api/generate", json={"model": "m", "prompt": "z"},
                      headers=bearer(TEAM), stream=True, timeout=5)
    next(r.iter_lines())
    assert usage(lb)["inFlight"] == 1
    r.close()
    assert wait_until(lambda: usage(lb)["inFlight"] == 0)
    assert client.generate(model="m", prompt="again").done


def test_tokens_are_counted_from_every_api_and_the_daily_quota_is_enforced(fake_node,
                                                                           appliance):
    node = fake_node(["m"])
    lb = appliance([node], security=keys(tokensPerDay=120))
    client = ollama.Client(host=lb.url, headers=bearer(TEAM))
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=TEAM, max_retries=0)
    want_in = want_out = 0
    reply = client.generate(model="m", prompt="why is the sky blue")
    want_in, want_out = want_in + reply.prompt_eval_count, want_out + reply.eval_count
    last = list(client.chat(model="m", messages=[{"role": "user", "content": "hi there"}],
                            stream=True))[-1]
    want_in, want_out = want_in + last.prompt_eval_count, want_out + last.eval_count
    done = oa.chat.completions.create(model="m", messages=[{"role": "user", "content": "a"}])
    want_in += done.usage.prompt_tokens
    want_out += done.usage.completion_tokens
    chunks = list(oa.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "b"}], stream=True,
        stream_options={"include_usage": True}))
    want_in += chunks[-1].usage.prompt_tokens
    want_out += chunks[-1].usage.completion_tokens
    today = usage(lb)["today"]
    assert (today["tokensIn"], today["tokensOut"]) == (want_in, want_out)
    assert today["requests"] == 4 and want_in + want_out < 120
    # spend the rest, then every token-using request is refused until midnight UTC
    while usage(lb)["today"]["tokens"] < 120:
        client.generate(model="m", prompt="more")
    with pytest.raises(openai.RateLimitError) as err:
        oa.completions.create(model="m", prompt="x")
    assert err.value.body["type"] == "tokens"
    r = requests.post(f"{lb.url}/api/embed", json={"model": "m", "input": "x"},
                      headers=bearer(TEAM), timeout=5)
    assert r.status_code == 429 and "120 tokens today" in r.json()["error"]
    assert 1 <= int(r.headers["Retry-After"]) <= 86400
    assert client.list() is not None  # listing uses no tokens: still allowed


def test_a_stream_without_usage_is_charged_per_frame(fake_node, appliance):
    lb = appliance([fake_node(["m"], tokens=6)], security=keys())
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=TEAM, max_retries=0)
    frames = list(oa.chat.completions.create(model="m", stream=True,
                                             messages=[{"role": "user", "content": "b"}]))
    assert wait_until(lambda: usage(lb)["today"]["requests"] == 1)
    assert 6 <= usage(lb)["today"]["tokensOut"] <= len(frames) + 1


def test_client_limits_apply_per_address_without_keys(fake_node, appliance):
    node = fake_node(["m"])
    lb = appliance([node], security={"clientLimits": {"requestsPerMinute": 1}})
    client = ollama.Client(host=lb.url)
    assert client.generate(model="m", prompt="x").done
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m", prompt="x")
    assert err.value.status_code == 429 and "client 127.0.0.1" in err.value.error
    doc = requests.get(f"{lb.url}/admin/usage", timeout=5).json()
    assert doc["keys"] == {} and doc["clients"]["127.0.0.1"]["today"]["requests"] == 1


def test_usage_series_are_labelled_by_key_name_and_carry_no_secret(fake_node, appliance):
    lb = appliance([fake_node(["m"])], security=keys())
    ollama.Client(host=lb.url, headers=bearer(TEAM)).generate(model="m", prompt="x")
    requests.post(f"{lb.url}/api/pull", json={"model": "m"}, headers=bearer(TEAM), timeout=5)
    text = requests.get(f"{lb.url}/metrics", headers=bearer(ROOT), timeout=5).text
    assert 'ollama_lb_key_requests_total{key="team"} 1.0' in text
    assert 'ollama_lb_key_requests_total{key="root"} 0.0' in text  # declared at 0
    assert 'ollama_lb_key_rejections_total{key="team",reason="scope"} 1.0' in text
    assert 'ollama_lb_key_tokens_total{direction="out",key="team"} 8.0' in text
    assert 'ollama_lb_key_time_to_first_token_seconds_count{key="team"} 1.0' in text
    assert 'ollama_lb_key_inflight{key="team"} 0.0' in text
    for secret in (TEAM, ROOT, hash_key(TEAM)[7:], hash_key(ROOT)[7:]):
        assert secret not in text


def test_usage_survives_a_restart_in_the_usage_file(fake_node, tmp_path):
    node = fake_node(["m"])
    file = tmp_path / "usage.sqlite"
    cfg = parse_config({"server": {"host": "127.0.0.1", "port": 0},
                        "nodes": [{"id": "n0", "url": node.url}],
                        "security": {**keys(tokensPerDay=5), "usageFile": str(file)}})

    def rows() -> list:
        with sqlite3.connect(file) as db:
            return db.execute("SELECT key, requests, tokens_in + tokens_out FROM usage"
                              ).fetchall()

    with OllamaLoadBalancerApplication(cfg, watch=False) as first:
        client = ollama.Client(host=first.url, headers=bearer(TEAM))
        reply = client.generate(model="m", prompt="x")
        spent = reply.prompt_eval_count + reply.eval_count
        assert wait_until(lambda: rows() == [("team", 1, spent)])  # written behind
        with pytest.raises(ollama.ResponseError):
            client.generate(model="m", prompt="x")  # the quota (5) is used up
    with OllamaLoadBalancerApplication(cfg, watch=False) as second:
        assert usage(second)["total"]["requests"] == 1
        assert usage(second)["today"]["tokens"] == spent
        with pytest.raises(ollama.ResponseError) as err:
            ollama.Client(host=second.url, headers=bearer(TEAM)).generate(model="m",
                                                                         prompt="x")
        assert err.value.status_code == 429  # still used up after the restart


def sse_usage(text: str) -> dict:
    """The usage of the last SSE frame that reports one (Anthropic, Responses)."""
    found: dict = {}
    for line in text.splitlines():
        if line.startswith("data:"):
            doc = json.loads(line[5:])
            found = doc.get("usage") or (doc.get("response") or {}).get("usage") or found
    return found


def test_anthropic_and_responses_usage_is_counted(fake_node, appliance):
    lb = appliance([fake_node(["m"])], security=keys())
    want_in = want_out = 0
    for path, body in (("/v1/messages", {"model": "m", "max_tokens": 5,
                                         "messages": [{"role": "user", "content": "hi"}]}),
                       ("/v1/responses", {"model": "m", "input": "hello there"})):
        done = requests.post(f"{lb.url}{path}", json=body, headers={"x-api-key": TEAM},
                             timeout=5).json()
        streamed = requests.post(f"{lb.url}{path}", json={**body, "stream": True},
                                 headers={"x-api-key": TEAM}, timeout=5).text
        for reported in (done["usage"], sse_usage(streamed)):
            want_in += reported["input_tokens"]
            want_out += reported["output_tokens"]
    today = usage(lb)["today"]
    assert today["requests"] == 4 and want_out > 0
    assert (today["tokensIn"], today["tokensOut"]) == (want_in, want_out)


def test_failed_requests_count_as_errors_and_give_their_place_back(fake_node, appliance):
    node = fake_node(["m"])
    lb = appliance([node], security=keys(maxConcurrent=1), retry={"maxRetries": 0})
    client = ollama.Client(host=lb.url, headers=bearer(TEAM))
    node.node.set_fault("500", count=1)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="m", prompt="x")
    assert err.value.status_code == 500
    node.node.set_fault("reset-mid-stream", count=1)
    with pytest.raises(ollama.ResponseError):
        list(client.generate(model="m", prompt="x", stream=True))  # ends with an error line
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="nope", prompt="x")
    assert err.value.status_code == 404
    assert wait_until(lambda: usage(lb)["inFlight"] == 0)
    assert client.generate(model="m", prompt="x").done  # the one place is free
    today = usage(lb)["today"]
    assert today["requests"] == 4 and today["errors"] == 3  # 500, broken stream, 404
