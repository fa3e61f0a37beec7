"""What the key path remembers between requests never outlives the keys it was learnt from.

The gate remembers which key a credential header named, and each key remembers its verdict on
the model names it was asked about (``app/keys.py``), so a client sending the same header and
model again costs no digest and no glob. These tests hold that to the rules the first lookup
keeps: each header is judged as itself, a rotated or removed key stops at once, a changed
model list applies to the very next request, and the memory stays correct past its bound.
Real sockets: the appliance in front of a simulated node, ``requests`` and the ``ollama`` and
``openai`` clients.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import ollama
import openai
import pytest
import requests
import yaml
from conftest import assert_no_leaks, lb_config

from app.keys import MAX_REMEMBERED, hash_key, new_key
from app.server import OllamaLoadBalancerApplication

KEY, OTHER = new_key(), new_key()


def entry(name: str, key: str, **extra) -> dict:
    return {"name": name, "hash": hash_key(key), **extra}


def status(lb, headers: dict[str, str], model: str = "m") -> int:
    r = requests.post(f"{lb.url}/api/generate", headers=headers, timeout=10,
                      json={"model": model, "prompt": "x", "stream": False,
                            "options": {"num_predict": 1}})
    return r.status_code


class Reloadable:
    """The appliance on a config file, reloaded as ``SIGHUP`` or ``/admin/reload`` would."""

    def __init__(self, path: Path, node, keys: list[dict]) -> None:
        self.path, self.node = path, node
        self.write(keys)
        self.app = OllamaLoadBalancerApplication(str(path), watch=False).start()
        assert self.app.factory is not None
        self.app.factory.health_checker.check_all(discover=True)
        self.url = self.app.url

    def write(self, keys: list[dict]) -> None:
        self.path.write_text(yaml.safe_dump(lb_config([self.node],
                                                      security={"apiKeys": keys})))

    def reload(self, keys: list[dict]) -> None:
        self.write(keys)
        assert self.app.reload_state.reload("test")["result"] == "applied"


@pytest.fixture
def reloadable(fake_node, tmp_path):
    made: list[Reloadable] = []

    def make(models: list[str], keys: list[dict]) -> Reloadable:
        lb = Reloadable(tmp_path / "c.yaml", fake_node(models), keys)
        made.append(lb)
        return lb

    yield make
    for lb in made:
        try:
            assert_no_leaks(lb.app)
        finally:
            lb.app.shutdown(drain_s=0)


def test_each_credential_header_is_judged_as_itself(fake_node, appliance):
    """A header value that once named a key is remembered as that value only: the same text
    in the other header, another scheme, or a near miss of the key is refused every time."""
    lb = appliance([fake_node(["m"])], security={"apiKeys": [entry("team", KEY)]})
    for _ in range(3):  # the first request learns, the next ones are answered from memory
        assert status(lb, {"Authorization": f"Bearer {KEY}"}) == 200
        assert status(lb, {"x-api-key": KEY}) == 200
        assert status(lb, {"x-api-key": f"Bearer {KEY}"}) == 401
        assert status(lb, {"Authorization": KEY}) == 401  # no scheme
        assert status(lb, {"Authorization": f"Basic {KEY}"}) == 401
        assert status(lb, {"Authorization": f"Bearer {KEY[:-1]}"}) == 401
        assert status(lb, {"Authorization": f"Bearer {KEY}x"}) == 401
        assert status(lb, {}) == 401
    # the official clients, each with its own header
    assert ollama.Client(host=lb.url, headers={"Authorization": f"Bearer {KEY}"}).generate(
        model="m", prompt="x", options={"num_predict": 1}).done
    oa = openai.OpenAI(base_url=f"{lb.url}/v1", api_key=KEY, max_retries=0)
    assert oa.chat.completions.create(model="m", max_tokens=1,
                                      messages=[{"role": "user", "content": "x"}]).choices


def test_more_spellings_than_are_remembered_all_still_work_and_a_wrong_key_never_does(
        fake_node, appliance):
    """Past its bound the memory starts over: every valid spelling keeps working, and
    unknown keys, which are never remembered, keep failing."""
    lb = appliance([fake_node(["m"])], security={"apiKeys": [entry("team", KEY)]})
    schemes = ("".join(c) for c in itertools.product(*(({ch, ch.upper()}) for ch in "bearer")))
    spellings = [f"{s}{' ' * gap}{KEY}" for s in sorted(schemes) for gap in (1, 2)]
    assert len(spellings) > MAX_REMEMBERED + 10
    for i, header in enumerate(spellings):
        assert status(lb, {"Authorization": header}) == 200, header
        if i % 16 == 0:
            assert status(lb, {"Authorization": f"Bearer {new_key()}"}) == 401
    assert status(lb, {"Authorization": spellings[0]}) == 200  # forgotten, learnt again


def test_a_rotated_or_removed_key_stops_at_once_however_often_it_was_used(reloadable):
    lb = reloadable(["m"], [entry("team", KEY), entry("other", OTHER)])
    for _ in range(3):
        assert status(lb, {"Authorization": f"Bearer {KEY}"}) == 200
        assert status(lb, {"x-api-key": OTHER}) == 200
    fresh = new_key()
    lb.reload([entry("team", fresh), entry("other", OTHER)])  # team's key rotated
    assert status(lb, {"Authorization": f"Bearer {KEY}"}) == 401
    assert status(lb, {"Authorization": f"Bearer {fresh}"}) == 200
    assert status(lb, {"x-api-key": OTHER}) == 200  # the key that stayed keeps working
    lb.reload([entry("team", fresh)])  # other removed
    assert status(lb, {"x-api-key": OTHER}) == 401
    assert status(lb, {"Authorization": f"Bearer {OTHER}"}) == 401
    lb.reload([entry("team", fresh), entry("other", OTHER)])  # and added back: works again
    assert status(lb, {"x-api-key": OTHER}) == 200


def test_model_verdicts_follow_the_allow_list_and_its_reload(reloadable):
    lb = reloadable(["llama3.2", "qwen2.5"], [entry("team", KEY, models=["llama3.2*"])])
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(3):  # first verdicts learnt, then remembered
        assert status(lb, auth, "llama3.2") == 200
        assert status(lb, auth, "registry.ollama.ai/library/llama3.2:latest") == 200
        assert status(lb, auth, "qwen2.5") == 403
    lb.reload([entry("team", KEY, models=["qwen2.5"])])
    assert status(lb, auth, "qwen2.5") == 200
    assert status(lb, auth, "llama3.2") == 403
    lb.reload([entry("team", KEY)])  # no list: every model
    assert status(lb, auth, "llama3.2") == 200 and status(lb, auth, "qwen2.5") == 200
