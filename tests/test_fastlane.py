"""The fast lane answers model-routed POSTs exactly as the Flask route beside it does."""

from __future__ import annotations

import json

import requests

BODY = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": False}
SAME = ("Content-Type", "Content-Length", "X-Request-ID")


def test_fast_lane_and_flask_route_give_the_same_reply(fake_node, appliance):
    lb = appliance([fake_node(["llama3.2"])])
    with requests.Session() as s:
        fast = s.post(f"{lb.url}/api/chat", json=BODY, headers={"X-Request-ID": "r-1"})
        # a browser's Origin header sends the same request through Flask (CORS tags it)
        flask = s.post(f"{lb.url}/api/chat", json=BODY,
                       headers={"X-Request-ID": "r-1", "Origin": "http://localhost"})
    assert fast.status_code == flask.status_code == 200
    assert {k: fast.headers.get(k) for k in SAME} == {k: flask.headers.get(k) for k in SAME} | {
        "Content-Length": str(len(fast.content))}  # the simulator's words vary in length
    assert fast.headers["X-Request-ID"] == "r-1"
    assert "Access-Control-Allow-Origin" in flask.headers  # it did take the other way
    assert fast.json()["message"] == flask.json()["message"]


def test_errors_in_the_fast_lane_keep_each_api_shape(fake_node, appliance):
    lb = appliance([fake_node(["llama3.2"])])
    native = requests.post(f"{lb.url}/api/chat", data=b'{"model": "nope", "messages": []}')
    openai = requests.post(f"{lb.url}/v1/chat/completions",
                           json={"model": "nope", "messages": [{"role": "user", "content": "x"}]})
    bad = requests.post(f"{lb.url}/api/generate", data=b"{not json")
    assert native.status_code == 404 and native.json() == {"error": "model 'nope' not found"}
    assert openai.status_code == 404 and openai.json()["error"]["type"] == "not_found_error"
    assert bad.status_code == 400 and "invalid character" in bad.json()["error"]
    assert native.headers["X-Request-ID"] and native.headers["Content-Type"].startswith(
        "application/json")


def test_a_browser_request_with_an_origin_still_gets_cors_headers(fake_node, appliance):
    lb = appliance([fake_node(["llama3.2"])])
    r = requests.post(f"{lb.url}/api/chat", data=json.dumps(BODY),
                      headers={"Origin": "http://localhost:3000"})
    assert r.status_code == 200
    assert r.headers["Access-Control-Allow-Origin"] == "http://localhost:3000"


def test_a_stream_through_the_fast_lane_arrives_whole(fake_node, appliance):
    lb = appliance([fake_node(["llama3.2"])])
    with requests.post(f"{lb.url}/api/chat", json={**BODY, "stream": True}, stream=True) as r:
        assert r.status_code == 200 and r.headers["Content-Type"] == "application/x-ndjson"
        assert "Content-Length" not in r.headers  # chunked, relayed as it arrives
        lines = [json.loads(line) for line in r.iter_lines() if line]
    assert lines[-1]["done"] is True and len(lines) > 2
