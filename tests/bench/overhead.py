"""Scenario 1: what a proxied non-streamed request costs, beside its baselines in one run.

Every target is driven by the same wrk command against the same simulated node (``fast``
profile, no delays), interleaved run by run so that the noise of a shared machine falls on all
of them alike: the node directly, the appliance, nginx (the reference C proxy) and smg (the
Rust LLM gateway; OpenAI paths only). CPU per request is read from /proc for each server's
whole process tree over its own runs, and for a bare Flask-on-gevent hello world at 10
connections, the floor of the appliance's stack. ``/v1/chat/completions`` is the endpoint the
goals are stated on, because smg serves it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import procs
import smgpeer
from wrkrun import med, spread, wrk

ENDPOINTS = {
    "chat": ("/v1/chat/completions",
             '{"model": "m", "messages": [{"role": "user", "content": "hi"}]}'),
    "generate": ("/api/generate", '{"model": "m", "prompt": "hi", "stream": false}'),
    "embed": ("/api/embed", '{"model": "all-minilm", "input": "hello"}'),
}
PROXIES = ("appliance", "nginx", "smg")
#: targets that serve only the OpenAI API
OPENAI_ONLY = {"smg"}
GOAL_ENDPOINT, GOAL_CONNS = "chat", 10


def measure(proc: procs.Proc, path: str, conns: int, seconds: float, body: str,
            work: Path, headers: dict[str, str] | None = None) -> dict[str, float]:
    """One wrk run, with the CPU the target's process tree spent on it per request."""
    cpu0 = proc.cpu_seconds()
    r = wrk(proc.url + path, conns, seconds, body, work, headers)
    r["cpu_us"] = (proc.cpu_seconds() - cpu0) / max(1, r["requests"]) * 1e6
    return r


def run(work: Path, quick: bool, repeats: int, notes: list[str], smg_venv: Path) -> dict[str, Any]:
    node = procs.fake_node("m,all-minilm", "fast", num_parallel=1024)
    started: list[procs.Proc] = [node]
    try:
        targets: dict[str, procs.Proc] = {"direct": node}
        targets["appliance"] = procs.appliance([node], work, caps=1024)
        started.append(targets["appliance"])
        if (ngx := procs.nginx([node], work)) is not None:
            targets["nginx"] = ngx
            started.append(ngx)
        smg, why = smgpeer.start([node], work, smg_venv)
        if smg is not None:
            targets["smg"] = smg
            started.append(smg)
        elif why:
            notes.append(f"smg column left out: {why}.")
        hello = procs.hello_world()
        started.append(hello)
        seconds = 2 if quick else 4
        endpoints = ["chat"] if quick else list(ENDPOINTS)
        rows = [cell(targets, name, conns, seconds, repeats, work)
                for name in endpoints for conns in ((1, 10) if quick else (1, 10, 100))]
        path, body = ENDPOINTS[GOAL_ENDPOINT]
        h = [measure(hello, path, GOAL_CONNS, seconds, body, work) for _ in range(repeats)]
    finally:
        for p in reversed(started):
            p.stop()
    return {"rows": rows, "hello": {"rps": [r["rps"] for r in h],
                                    "cpu_us": [r["cpu_us"] for r in h]},
            "seconds": seconds, "repeats": repeats, "targets": list(targets)}


def cell(targets: dict[str, procs.Proc], endpoint: str, conns: int, seconds: float,
         repeats: int, work: Path) -> dict[str, Any]:
    """``repeats`` rounds of every target at one endpoint and connection count."""
    path, body = ENDPOINTS[endpoint]
    runs: dict[str, dict[str, list[float]]] = {}
    for _ in range(repeats):
        for name, proc in targets.items():
            if name in OPENAI_ONLY and not path.startswith("/v1/"):
                continue
            r = measure(proc, path, conns, seconds, body, work)
            for k, v in r.items():
                runs.setdefault(name, {}).setdefault(k, []).append(v)
    return {"endpoint": endpoint, "path": path, "conns": conns, "runs": runs}


def added(t: dict[str, list[float]] | None, d: dict[str, list[float]], key: str) -> str:
    return f"{med(t[key]) - med(d[key]):.2f}" if t else "n/a"


def report(res: dict[str, Any]) -> str:
    order = " / ".join(PROXIES)
    lines = [f"### 1. Request/response overhead (wrk, 1 thread, {res['seconds']} s x "
             f"{res['repeats']} runs, interleaved; median (min-max))", "",
             f"| endpoint | conns | direct req/s | req/s: {order} | added p50 (ms): {order} | "
             f"added p99 (ms): {order} | CPU/req (us): {order} | errors |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        runs = row["runs"]
        d = runs["direct"]
        ps = [runs.get(p) for p in PROXIES]
        errors = ", ".join(f"{name} {n}" for name, r in runs.items()
                           if (n := int(sum(r["non2xx"]) + sum(r["socket_errors"])))) or "0"
        lines.append(
            f"| {row['endpoint']} `{row['path']}` | {row['conns']} | {spread(d['rps'])} | "
            + " / ".join(spread(p["rps"]) if p else "n/a" for p in ps) + " | "
            + " / ".join(added(p, d, "p50_ms") for p in ps) + " | "
            + " / ".join(added(p, d, "p99_ms") for p in ps) + " | "
            + " / ".join(f"{med(p['cpu_us']):.0f}" if p else "n/a" for p in ps)
            + f" | {errors} |")
    h = res["hello"]
    lines += ["", f"Bare Flask-on-gevent hello world (`tests/bench/hello.py`, same run, "
              f"{GOAL_CONNS} conns, `{ENDPOINTS[GOAL_ENDPOINT][0]}`): {spread(h['rps'])} req/s, "
              f"{med(h['cpu_us']):.0f} us CPU per request. Direct (the node itself): its own "
              "CPU is not charged to any proxy. Errors: non-2xx replies plus socket errors "
              "(wrk's 2 s timeout included) summed over the row's runs, per target (0: every "
              "figure is of real answers)."]
    return "\n".join(lines)


def goal_figures(res: dict[str, Any]) -> dict[str, float | None]:
    """The figures the issue's non-streaming goals are stated in (None where unmeasured)."""
    def runs(conns: int) -> dict[str, dict[str, list[float]]]:
        return next((r["runs"] for r in res["rows"]
                     if r["endpoint"] == GOAL_ENDPOINT and r["conns"] == conns), {})

    ten, one = runs(GOAL_CONNS), runs(1)
    a, s = ten.get("appliance"), ten.get("smg")
    hello = med(res["hello"]["cpu_us"])
    return {
        "cpu_us": med(a["cpu_us"]) if a else None,
        "hello_cpu_us": hello,
        "smg_cpu_us": med(s["cpu_us"]) if s else None,
        "cpu_vs_hello": med(a["cpu_us"]) / hello if a else None,
        "cpu_vs_smg": med(a["cpu_us"]) / med(s["cpu_us"]) if a and s else None,
        "rps": med(a["rps"]) if a else None,
        "smg_rps": med(s["rps"]) if s else None,
        "rps_vs_smg": med(a["rps"]) / med(s["rps"]) if a and s else None,
        "added_p50_1_ms": (med(one["appliance"]["p50_ms"]) - med(one["direct"]["p50_ms"])
                           if one.get("appliance") else None),
    }
