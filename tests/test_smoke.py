"""The foundation end to end: the official ollama client through the appliance."""

from __future__ import annotations

import ollama


def test_generate_through_appliance_matches_direct(fake_node, appliance):
    a = fake_node(["llama3.2"])
    b = fake_node(["llama3.2", "mistral"])
    lb = appliance([a, b])
    via = ollama.Client(host=lb.url).generate(model="llama3.2", prompt="Why is the sky blue?")
    direct = ollama.Client(host=a.url).generate(model="llama3.2", prompt="Why is the sky blue?")
    assert via.response == direct.response
    assert via.done and via.eval_count == direct.eval_count
