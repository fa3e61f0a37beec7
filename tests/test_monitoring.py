"""The shipped alert rules and Grafana dashboard only use series the appliance exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import ollama
import pytest
import requests
import yaml

from pipeline.metrics import RELOAD_RESULTS

DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "monitoring"
NAME = re.compile(r"\bollama_lb_[a-z_]+")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def exported(scrape: str) -> set[str]:
    names = set()
    for line in scrape.splitlines():
        if line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def expressions():
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exprs = [r["expr"] for g in rules["groups"] for r in g["rules"]]
    dash = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs += [t["expr"] for p in dash["panels"] for t in p["targets"]]
    return exprs


def test_alert_rules_are_well_formed():
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
            assert rule["alert"].startswith("OllamaLB") and rule["annotations"]["summary"]
            assert rule["labels"]["severity"] in {"info", "warning", "critical"}
            assert rule["expr"].count("(") == rule["expr"].count(")")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules():
    out = subprocess.run(["promtool", "check", "rules", str(DEPLOY / "alerts.yml")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_series_in_rules_and_dashboard_is_exported(fake_node, appliance):
    node = fake_node(["m"])
    lb = appliance([node])
    client = ollama.Client(host=lb.url)
    client.generate(model="m", prompt="x")
    requests.post(f"{lb.url}/api/generate", json={"model": "nope"}, timeout=5)  # an error
    node.node.set_fault("503", count=1)
    client.generate(model="m", prompt="retried")  # a retry (one node: same node again)
    live = exported(requests.get(f"{lb.url}/metrics", timeout=5).text)
    missing = set()
    for expr in expressions():
        for name in NAME.findall(expr):
            if name not in live and not any(name + s in live for s in SUFFIXES) and not any(
                    name.endswith(s) and name in live for s in SUFFIXES):
                missing.add(name)
    assert not missing, f"not exported: {sorted(missing)}"


def test_reload_results_are_exported_at_zero_before_any_reload(fake_node, appliance):
    """``increase()`` needs a sample before the first rejection, or the alert never fires."""
    lb = appliance([fake_node(["m"])])
    scrape = requests.get(f"{lb.url}/metrics", timeout=5).text
    for result in RELOAD_RESULTS:
        assert f'ollama_lb_config_reloads_total{{result="{result}"}} 0.0' in scrape
    alerted = {m for e in expressions() for m in re.findall(r'reloads_total\{result="(\w+)"', e)}
    assert alerted and alerted <= set(RELOAD_RESULTS)
