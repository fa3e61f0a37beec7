"""Scenarios 3 and 4: the appliance under more load than its pool serves, and how well each
strategy routes a realistic mixed workload.

Both drive the appliance alone (no peer proxy does the appliance's queueing, shedding or
model-aware routing), with gevent clients in the harness process, open loop: arrivals follow a
seeded Poisson process and never wait for earlier replies, as real users do not.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import gevent
import procs
import requests
from streamclient import one_stream, pct

# --- scenario 3 -------------------------------------------------------------------------------

def scenario_saturation(work: Path, quick: bool) -> dict[str, Any]:
    nodes = [procs.fake_node("m", "fast", tokens_per_second=50, tokens=20, num_parallel=4)
             for _ in range(2)]
    lb = procs.appliance(nodes, work, caps=4, disruptor={"queueSize": 40,
                                                         "queueTimeoutMs": 2000},
                         timeouts={"requestTimeoutMs": 10000}, logging={"level": "INFO"})
    capacity = 2 * 4 / (20 / 50)  # slots / service time = requests per second
    rate, seconds = 3 * capacity, (10 if quick else 30)
    counts = {"accepted": 0, "shed": 0, "shed_without_retry_after": 0, "errors": 0,
              "unanswered": 0}
    lat: list[float] = []

    def one() -> None:
        t0 = time.perf_counter()
        try:
            r = requests.post(lb.url + "/api/generate", timeout=15,
                              json={"model": "m", "prompt": "x", "stream": False})
        except requests.RequestException:
            counts["unanswered"] += 1
            return
        if r.status_code == 200 and r.json().get("done"):
            counts["accepted"] += 1
            lat.append(time.perf_counter() - t0)
        elif r.status_code == 503:
            counts["shed"] += 1
            if "Retry-After" not in r.headers:
                counts["shed_without_retry_after"] += 1
        else:
            counts["errors"] += 1

    try:
        jobs = []
        start = time.perf_counter()
        rng = random.Random(3)
        t = 0.0
        while t < seconds:
            t += rng.expovariate(rate)
            gevent.sleep(max(0.0, start + t - time.perf_counter()))
            jobs.append(gevent.spawn(one))
        gevent.joinall(jobs, timeout=30)
        gevent.sleep(0.5)
        health = procs.scrape(lb.url)
        waits = [json.loads(line).get("queue_wait_ms", 0) for line in
                 Path(lb.log_path).read_text().splitlines()  # type: ignore[arg-type]
                 if '"event": "request"' in line]
    finally:
        lb.stop()
        for n in nodes:
            n.stop()
    return {"offered_rps": rate, "capacity_rps": capacity, "seconds": seconds,
            "sent": len(jobs), **counts, "max_queue_wait_ms": max(waits, default=0),
            "queue_timeout_ms": 2000, "latency_p99_s": pct(lat, 99),
            "leaked_slots": sum(n["inFlight"] for n in health["nodes"]),
            "global_in_flight_after": health["pipeline"]["globalInFlight"]}


def report_saturation(r: dict[str, Any]) -> str:
    return "\n".join([
        f"### 3. Saturation: {r['offered_rps']:.0f} req/s offered for {r['seconds']} s to a pool "
        f"that serves {r['capacity_rps']:.0f} req/s (2 nodes x 4 slots, 0.4 s per request)", "",
        "| sent | accepted | shed (503) | shed without Retry-After | other errors | unanswered |"
        " max queue wait (ms; bound 2000) | slots held after |",
        "|---|---|---|---|---|---|---|---|",
        f"| {r['sent']} | {r['accepted']} | {r['shed']} | {r['shed_without_retry_after']} | "
        f"{r['errors']} | {r['unanswered']} | {r['max_queue_wait_ms']:.0f} | "
        f"{r['leaked_slots'] + r['global_in_flight_after']} |"])


# --- scenario 4 -------------------------------------------------------------------------------

STRATEGIES = ["round-robin", "weighted-round-robin", "least-in-flight", "random", "model-aware"]
MODELS = [("llama3.2", 0.5), ("mistral", 0.3), ("qwen2.5", 0.2)]


def scenario_routing(work: Path, quick: bool) -> dict[str, Any]:
    scale = 0.1  # 1 s of simulated time = 0.1 s here
    sim_seconds = 120 if quick else 300
    rate_sim = 1.6  # arrivals per simulated second
    rng = random.Random(42)
    arrivals = []
    t = 0.0
    while True:
        t += rng.expovariate(rate_sim)
        if t > sim_seconds:
            break
        model = rng.choices([m for m, _ in MODELS], [w for _, w in MODELS])[0]
        turns = 1 if rng.random() < 0.6 else rng.randint(2, 6)
        messages = []
        for i in range(turns):
            messages.append({"role": "user", "content": f"question {i} " + "word " * 60})
            if i < turns - 1:
                messages.append({"role": "assistant", "content": "answer " * 50})
        arrivals.append((t, model, messages))
    out: dict[str, Any] = {"scale": scale, "sim_seconds": sim_seconds, "requests":
                           len(arrivals), "rate_sim": rate_sim, "strategies": {}}
    for name in STRATEGIES:
        nodes = [procs.fake_node(",".join(m for m, _ in MODELS), "realistic",
                                 num_parallel=2, max_loaded_models=1, load_seconds=3 * scale,
                                 tokens_per_second=50 / scale, prefill_tps=2000 / scale,
                                 tokens=60, keep_alive_seconds=300 * scale,
                                 fault_api=True)  # /_fake/stats gives the cold loads
                 for _ in range(4)]
        lb = procs.appliance(nodes, work, caps=2, strategy={"type": name},
                             disruptor={"queueTimeoutMs": 120000},
                             healthCheck={"intervalMs": 500, "modelRefreshMs": 500})
        try:
            out["strategies"][name] = run_routing(lb, nodes, arrivals, scale)
        finally:
            lb.stop()
            for n in nodes:
                n.stop()
    return out


def run_routing(lb: procs.Proc, nodes: list[procs.Proc], arrivals: list[Any],
                scale: float) -> dict[str, Any]:
    results: list[dict[str, Any]] = []

    def one(model: str, messages: list[Any]) -> None:
        body = json.dumps({"model": model, "messages": messages}).encode()
        results.append(one_stream(lb.url, "/api/chat", body, timeout=300))

    start = time.perf_counter()
    jobs = []
    for t, model, messages in arrivals:
        gevent.sleep(max(0.0, start + t * scale - time.perf_counter()))
        jobs.append(gevent.spawn(one, model, messages))
    gevent.joinall(jobs, timeout=600)
    elapsed = time.perf_counter() - start
    ok = [r for r in results if r["done"] and r["times"]]
    ttft = [(r["times"][0] - r["start"]) / scale for r in ok]
    total = [(r["times"][-1] - r["start"]) / scale for r in ok]
    tokens = sum(len(r["times"]) - 1 for r in ok)
    loads = sum(requests.get(n.url + "/_fake/stats", timeout=5).json()["loads"] for n in nodes)
    return {"completed": len(ok), "failed": len(results) - len(ok),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "total_p95_s": pct(total, 95), "tokens_per_s": tokens / (elapsed / scale),
            "cold_loads": loads}


def report_routing(res: dict[str, Any]) -> str:
    lines = [f"### 4. Routing quality: 4 simulated nodes (2 slots, 1 model resident, 3 s cold "
             f"load, 50 tokens/s), 3 models (50/30/20 %), {res['requests']} chats (60 % "
             f"single-turn) over {res['sim_seconds']} simulated s at {res['rate_sim']}/s, "
             f"time scaled x{res['scale']}", "",
             "| strategy | TTFT p50 (s) | TTFT p95 (s) | total p95 (s) | tokens/s | cold loads |"
             " failed |", "|---|---|---|---|---|---|---|"]
    for name, r in res["strategies"].items():
        lines.append(f"| {name} | {r['ttft_p50_s']:.2f} | {r['ttft_p95_s']:.2f} | "
                     f"{r['total_p95_s']:.2f} | {r['tokens_per_s']:.0f} | {r['cold_loads']} | "
                     f"{r['failed']} |")
    rr, ma = res["strategies"]["round-robin"], res["strategies"]["model-aware"]
    lines.append(f"\nmodel-aware p95 TTFT is {rr['ttft_p95_s'] / ma['ttft_p95_s']:.1f}x lower "
                 "than round-robin (goal: 3x).")
    return "\n".join(lines)
