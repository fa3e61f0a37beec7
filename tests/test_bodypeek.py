"""A body read once: the gate reads it for a key with a model allow-list, the view takes it.

The gate (app/bodypeek.py) reads a model-routed body to learn the model it names; the view
(app/proxy.py) then takes those very bytes from the environ instead of reading them again
from a copy. What must hold either way: the node gets the body byte for byte, at the limit
and sent chunked as well, and a body over ``server.maxBodyBytes`` is a 413 no node sees.
Real clients (requests) against the appliance in front of a simulated node.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
import requests

from app.keys import hash_key, new_key

KEY = new_key()
LIMIT = 1000


@pytest.fixture(params=["models list", "no key"])
def lb_node(request, fake_node, appliance):
    """The appliance with a key limited to some models, or without keys: the body read by
    the gate, or by the view alone."""
    node = fake_node(["llama3.2"])
    keys = [{"name": "team", "hash": hash_key(KEY), "models": ["llama3.2*"]}]
    security = {"security": {"apiKeys": keys}} if request.param == "models list" else {}
    lb = appliance([node], server={"maxBodyBytes": LIMIT}, **security)
    return lb, node


def body_of(size: int) -> bytes:
    """A generate body of exactly ``size`` bytes."""
    empty = json.dumps({"model": "llama3.2", "prompt": "", "stream": False})
    body = json.dumps({"model": "llama3.2", "prompt": "x" * (size - len(empty)),
                       "stream": False}).encode()
    assert len(body) == size
    return body


def post(lb, body: bytes | Iterator[bytes]) -> requests.Response:
    return requests.post(f"{lb.url}/api/generate", data=body, timeout=10,
                         headers={"Authorization": f"Bearer {KEY}",
                                  "Content-Type": "application/json"})


def test_a_body_at_the_limit_reaches_the_node_byte_for_byte(lb_node):
    lb, node = lb_node
    body = body_of(LIMIT)
    r = post(lb, body)
    assert r.status_code == 200 and r.json()["done"] is True
    assert node.stats.last_body == body


def test_a_chunked_body_reaches_the_node_whole(lb_node):
    lb, node = lb_node
    body = body_of(600)
    r = post(lb, iter([body[:100], body[100:450], body[450:]]))  # Transfer-Encoding: chunked
    assert r.status_code == 200 and r.json()["done"] is True
    assert node.stats.last_body == body


@pytest.mark.parametrize("chunked", [False, True])
def test_a_body_over_the_limit_is_413_and_no_node_sees_it(lb_node, chunked):
    lb, node = lb_node
    body = body_of(LIMIT + 1)
    r = post(lb, iter([body]) if chunked else body)
    assert r.status_code == 413 and "too large" in r.json()["error"]
    assert node.stats.by_path.get("/api/generate") is None
    r = post(lb, body_of(200))  # the next one is served
    assert r.status_code == 200
