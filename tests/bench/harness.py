"""The benchmark report: `make bench` runs this after the ring microbenchmarks.

Scenarios (each beside its baselines, in the same run, on the same machine):
  1. request/response overhead: wrk against the node directly, the appliance, and nginx
  2. streaming relay: 1/100/1000 concurrent chat streams at 20 tokens/s
  3. saturation and shedding: 3x the pool's capacity, open loop
  4. routing quality: 4 realistic simulated nodes, 3 models, Poisson arrivals, all strategies
  5. the ring microbenchmarks (from pytest-benchmark's JSON)

Prints a Markdown report and writes bench-results/report.json. Everything runs on loopback,
is started and stopped here, and is bounded in time. Usage:
  python tests/bench/harness.py [--quick] [--scenarios 1,2,3,4,5] [--repeats N]
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import json
import os
import platform
import random
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path
from typing import Any

import gevent
import requests

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import procs
from streamclient import one_stream, pct

RESULTS = Path("bench-results")


# --- helpers ----------------------------------------------------------------------------------

def wrk(url: str, conns: int, seconds: float, body: str, workdir: Path) -> dict[str, float]:
    script = workdir / f"post-{abs(hash(body))}.lua"
    script.write_text('wrk.method = "POST"\n'
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body)}\n")
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", "-s",
                          str(script), url], capture_output=True, text=True, timeout=seconds + 30)
    text = out.stdout

    def dur(token: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", token).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M))
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore
            "p50_ms": dur(lat["50"]), "p99_ms": dur(lat["99"]), "requests": total,
            "non2xx": int(errors.group(1)) if errors else 0}


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    return f"{med(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nginx_v = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip() \
        if shutil.which("nginx") else "absent"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "gevent": version("gevent"), "flask": version("flask"),
            "requests": version("requests"), "nginx": nginx_v,
            "wrk": subprocess.run(["wrk", "-v"], capture_output=True, text=True
                                  ).stdout.split("\n")[0].strip() if shutil.which("wrk")
            else "absent", "kernel": platform.release()}


# --- scenario 1 -------------------------------------------------------------------------------

def scenario_overhead(work: Path, quick: bool, repeats: int) -> dict[str, Any]:
    node = procs.fake_node("m,all-minilm", "fast", num_parallel=1024)
    lb = procs.appliance([node], work, caps=1024)
    ngx = procs.nginx([node], work)
    hello = procs.hello_world()
    seconds = 2 if quick else 4
    bodies = {"generate": '{"model": "m", "prompt": "hi", "stream": false}',
              "embed": '{"model": "all-minilm", "input": "hello"}'}
    paths = {"generate": "/api/generate", "embed": "/api/embed"}
    targets = {"direct": node, "appliance": lb} | ({"nginx": ngx} if ngx else {})
    rows: list[dict[str, Any]] = []
    try:
        for endpoint, body in bodies.items():
            for conns in (1, 10, 100):
                cell: dict[str, dict[str, list[float]]] = {}
                for _ in range(repeats):
                    for name, proc in targets.items():
                        cpu0 = proc.cpu_seconds()
                        r = wrk(proc.url + paths[endpoint], conns, seconds, body, work)
                        r["cpu_us"] = (proc.cpu_seconds() - cpu0) / max(1, r["requests"]) * 1e6
                        for k, v in r.items():
                            cell.setdefault(name, {}).setdefault(k, []).append(v)
                rows.append({"endpoint": endpoint, "conns": conns, "runs": cell})
        cpu0 = hello.cpu_seconds()
        h = wrk(hello.url + "/api/generate", 10, seconds, bodies["generate"], work)
        hello_cpu = (hello.cpu_seconds() - cpu0) / max(1, h["requests"]) * 1e6
    finally:
        for p in (hello, ngx, lb, node):
            if p:
                p.stop()
    return {"rows": rows, "hello_cpu_us": hello_cpu, "hello_rps": h["rps"],
            "seconds": seconds, "repeats": repeats}


def report_overhead(res: dict[str, Any]) -> str:
    lines = ["### 1. Request/response overhead (wrk, 1 thread, "
             f"{res['seconds']} s x {res['repeats']} runs; median (min-max))", "",
             "| endpoint | conns | direct req/s | appliance req/s | nginx req/s | appliance "
             "added p50 / p99 (ms) | nginx added p50 / p99 (ms) | appliance CPU/req (us) |",
             "|---|---|---|---|---|---|---|---|"]
    for row in res["rows"]:
        runs = row["runs"]
        d, a, n = runs["direct"], runs["appliance"], runs.get("nginx")

        def added(t: dict[str, list[float]], d: dict[str, list[float]] = d) -> str:
            return (f"{med(t['p50_ms']) - med(d['p50_ms']):.2f} / "
                    f"{med(t['p99_ms']) - med(d['p99_ms']):.2f}")

        lines.append(f"| {row['endpoint']} | {row['conns']} | {spread(d['rps'])} | "
                     f"{spread(a['rps'])} | {spread(n['rps']) if n else 'n/a'} | {added(a)} | "
                     f"{added(n) if n else 'n/a'} | {med(a['cpu_us']):.0f} |")
    lines += ["", f"Bare Flask-on-gevent hello world (same run, 10 conns): "
              f"{res['hello_rps']:,.0f} req/s, {res['hello_cpu_us']:.0f} us CPU per request."]
    ten = next(r for r in res["rows"] if r["endpoint"] == "generate" and r["conns"] == 10)
    cpu = med(ten["runs"]["appliance"]["cpu_us"])
    lines.append(f"Appliance CPU per proxied generate at 10 conns: {cpu:.0f} us = "
                 f"{cpu / res['hello_cpu_us']:.2f}x the hello world (goal: within 2.5x).")
    return "\n".join(lines)


# --- scenario 2 -------------------------------------------------------------------------------

def run_streams(url: str, n: int, watch: procs.Proc | None = None) -> dict[str, Any]:
    p = subprocess.Popen([sys.executable, str(HERE / "streamclient.py"), url, str(n), "m",
                          str(min(1.0, n / 500))], stdout=subprocess.PIPE, text=True)
    peak = 0.0
    while p.poll() is None:
        if watch is not None:
            peak = max(peak, watch.rss_mb())
        time.sleep(0.1)
    out = json.loads(p.stdout.read())  # type: ignore[union-attr]
    out["rss_peak_mb"] = round(peak, 1) if watch else None
    return out


def scenario_streams(work: Path, quick: bool) -> dict[str, Any]:
    node = procs.fake_node("m", "fast", num_parallel=4096, tokens_per_second=20, tokens=40,
                           max_queue=4096)
    lb = procs.appliance([node], work, caps=4096)
    ngx = procs.nginx([node], work)
    out: dict[str, Any] = {"counts": [1, 100] if quick else [1, 100, 1000], "runs": {}}
    try:
        for n in out["counts"]:
            out["runs"][n] = {"direct": run_streams(node.url, n),
                              "appliance": run_streams(lb.url, n, watch=lb)}
            if ngx:
                out["runs"][n]["nginx"] = run_streams(ngx.url, n)
            out["runs"][n]["appliance_rss_idle_mb"] = round(lb.rss_mb(), 1)
    finally:
        for p in (ngx, lb, node):
            if p:
                p.stop()
    return out


def report_streams(res: dict[str, Any]) -> str:
    lines = ["### 2. Streaming relay (/api/chat, 40 tokens at 20 tokens/s per stream)", "",
             "| streams | TTFT p50 / p99 direct (ms) | appliance added TTFT p99 (ms) | nginx "
             "added TTFT p99 (ms) | gap p99 direct / appliance / nginx (ms) | appliance gap max "
             "(ms) | appliance peak RSS (MB) | stalled / broken (appliance) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, run in res["runs"].items():
        d, a, g = run["direct"], run["appliance"], run.get("nginx")
        lines.append(
            f"| {n} | {d['ttft_p50_ms']:.1f} / {d['ttft_p99_ms']:.1f} | "
            f"{a['ttft_p99_ms'] - d['ttft_p99_ms']:.2f} | "
            f"{(g['ttft_p99_ms'] - d['ttft_p99_ms']) if g else float('nan'):.2f} | "
            f"{d['gap_p99_ms']:.1f} / {a['gap_p99_ms']:.1f} / "
            f"{g['gap_p99_ms'] if g else float('nan'):.1f} | {a['gap_max_ms']:.1f} | "
            f"{a['rss_peak_mb']} | {a['stalled']} / {a['broken']} |")
    return "\n".join(lines)


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


# --- scenario 5 -------------------------------------------------------------------------------

def scenario_ring(ring_json: Path) -> dict[str, Any] | None:
    if not ring_json.exists():
        return None
    data = json.loads(ring_json.read_text())
    return {b["name"]: {"median_s": b["stats"]["median"], "min_s": b["stats"]["min"],
                        "max_s": b["stats"]["max"], **b.get("extra_info", {})}
            for b in data["benchmarks"]}


def report_ring(res: dict[str, Any]) -> str:
    loop = res["test_plain_loop_throughput"]
    lines = ["### 5. Ring microbenchmarks (20,000 requests through the six stage functions, "
             "no-op dispatch; 5 rounds, median (min-max) requests/s)", "",
             "| how | requests/s | vs plain loop |", "|---|---|---|"]
    for name, r in res.items():
        if "throughput" not in name:
            continue
        rps = [20000 / r["max_s"], 20000 / r["median_s"], 20000 / r["min_s"]]
        label = name.replace("test_", "").replace("_throughput", "")
        lines.append(f"| {label} | {rps[1]:,.0f} ({rps[0]:,.0f}-{rps[2]:,.0f}) | "
                     f"{loop['median_s'] / r['median_s']:.2f}x |")
    lat = res.get("test_ring_latency_at_10k_per_second")
    if lat:
        lines.append(f"\nAt 10,000 requests/s offered: ring p50 {lat['p50_us']:.0f} us, p99 "
                     f"{lat['p99_us']:.0f} us per request (submit to done); the same stage "
                     f"functions in a plain loop: p50 {lat['loop_p50_us']:.0f} us, p99 "
                     f"{lat['loop_p99_us']:.0f} us. Added by the ring: p50 "
                     f"{lat['p50_us'] - lat['loop_p50_us']:.0f} us, p99 "
                     f"{lat['p99_us'] - lat['loop_p99_us']:.0f} us.")
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter runs, fewer streams")
    ap.add_argument("--scenarios", default="1,2,3,4,5")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ring-json", default=str(RESULTS / "ring.json"))
    args = ap.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 streams = 3000+ sockets
    RESULTS.mkdir(exist_ok=True)
    wanted = {int(s) for s in args.scenarios.split(",")}
    report: dict[str, Any] = {"machine": machine()}
    sections = []
    with tempfile.TemporaryDirectory(prefix="ollama-lb-bench-") as tmp:
        work = Path(tmp)
        steps = [(1, "overhead", lambda: scenario_overhead(work, args.quick, args.repeats),
                  report_overhead),
                 (2, "streams", lambda: scenario_streams(work, args.quick), report_streams),
                 (3, "saturation", lambda: scenario_saturation(work, args.quick),
                  report_saturation),
                 (4, "routing", lambda: scenario_routing(work, args.quick), report_routing),
                 (5, "ring", lambda: scenario_ring(Path(args.ring_json)), report_ring)]
        for number, key, run, render in steps:
            if number not in wanted:
                continue
            if number == 1 and not shutil.which("wrk"):
                sections.append("### 1. skipped: wrk is not installed (apt-get install wrk)")
                continue
            print(f"running scenario {number} ({key})...", file=sys.stderr, flush=True)
            result = run()
            if result is None:
                continue
            report[key] = result
            sections.append(render(result))
    m = report["machine"]
    header = (f"Measured {m['date']} on {m['cpu']} ({m['cpus']} CPUs), Linux {m['kernel']}, "
              f"Python {m['python']}, gevent {m['gevent']}, Flask {m['flask']}, requests "
              f"{m['requests']}, {m['nginx']}, {m['wrk']}. Everything on one machine: load "
              "generator, appliance, baselines and simulated nodes share its CPUs.")
    text = header + "\n\n" + "\n\n".join(sections) + "\n"
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2, default=str))
    (RESULTS / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
