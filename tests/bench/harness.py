"""The benchmark report: `make bench` runs this after the ring microbenchmarks.

Scenarios (each beside its baselines, in the same run, on the same machine):
  1. request/response overhead: wrk against the node directly, the appliance, nginx and smg
     (``overhead.py``), CPU per request for each, and a Flask-on-gevent hello world
  2. streaming relay: 1/100/1000 concurrent OpenAI chat streams at 20 tokens/s through each
     proxy (``streams.py``)
  3. saturation and shedding: 3x the pool's capacity, open loop (``loadtests.py``)
  4. routing quality: 4 realistic simulated nodes, 3 models, Poisson arrivals, all strategies
  5. the ring microbenchmarks (from pytest-benchmark's JSON)
  6. the cost of API keys: the appliance with and without ``security.apiKeys`` (``apikeys.py``)
  7. several workers and shared caps: ``server.workers`` 1 and 2 with a real redis-server, and
     Redis mode against local mode (``workers.py``)
and first the goals of issue 14 (``goals.py``), met or not, each with its figure.

Writes bench-results/report.md and report.json and prints the report. Everything runs on
loopback, is started and stopped here, and is bounded in time. What the machine lacks (wrk,
nginx, redis-server: Debian packages; smg: installed by the harness into
bench-results/.smg-venv) is said at the start and in the report, and only what needs it is left
out. Usage:
  python tests/bench/harness.py [--quick] [--scenarios 1,2,3,4,5,6,7] [--repeats N]
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import apikeys
import goals
import loadtests
import overhead
import procs
import smgpeer
import streams
import workers

RESULTS = Path("bench-results")
WRK_SCENARIOS = {1, 6, 7}  # driven by wrk: skipped without it
SMG_VENV = RESULTS / ".smg-venv"


def _first_line(args: list[str], stream: str = "stdout") -> str:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "absent"
    return (getattr(out, stream).strip().splitlines() or ["?"])[0]


def machine() -> dict[str, Any]:
    cpu = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    nginx = procs.nginx_binary()
    smg = smgpeer.installed_version(SMG_VENV) if smgpeer.binary(SMG_VENV).exists() else None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "cpu": cpu,
            "cpus": os.cpu_count(), "python": platform.python_version(),
            "gevent": version("gevent"), "flask": version("flask"),
            "requests": version("requests"),
            "nginx": _first_line([nginx, "-v"], "stderr") if nginx else "nginx absent",
            "wrk": _first_line(["wrk", "-v"]) if shutil.which("wrk") else "wrk absent",
            "smg": f"sglang-router {smg}" if smg else "smg not installed",
            "commit": _first_line(["git", "describe", "--always", "--dirty"]),
            "load": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
            "kernel": platform.release()}


def missing_tools(wanted: set[int]) -> list[str]:
    """What this machine lacks for the scenarios asked for, and what is left out for it."""
    notes = []
    if wanted & WRK_SCENARIOS and not shutil.which("wrk"):
        skipped = ", ".join(str(n) for n in sorted(wanted & WRK_SCENARIOS))
        notes.append(f"wrk is missing (Debian package `wrk`: `apt-get install wrk`): scenarios "
                     f"{skipped} are skipped.")
    if 7 in wanted and procs.redis_binary() is None:
        notes.append("redis-server is missing (Debian package `redis-server`): scenario 7 "
                     "(several workers, shared caps) is skipped.")
    if wanted & {1, 2} and procs.nginx_binary() is None:
        notes.append("nginx is missing (Debian package `nginx-light` or `nginx`): the nginx "
                     "column is left out.")
    if 6 in wanted and not shutil.which("valgrind"):
        notes.append("valgrind is missing (Debian package `valgrind`): scenario 6 reports the "
                     "keys' cost in CPU time only, without instruction counts.")
    return notes


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
        lines += ["", "At 10,000 requests/s offered, from when a request is due to its dispatch "
                  f"(each figure the median of {len(lat.get('rounds', [])) or 1} rounds of 1 s "
                  "through the ring and 1 s through the loop):",
                  "", "| arrivals | ring p50 / p99 (us) | plain loop p50 / p99 (us) | "
                  "added by the ring p50 / p99 (us) |", "|---|---|---|---|"]
        for label, k in (("paced, one every 100 us", ""), ("bursts, ten each 1 ms", "burst_")):
            if f"{k}p50_us" not in lat:
                continue
            ring, loop = (lat[f"{k}p50_us"], lat[f"{k}p99_us"]), (lat[f"{k}loop_p50_us"],
                                                                  lat[f"{k}loop_p99_us"])
            lines.append(f"| {label} | {ring[0]:.0f} / {ring[1]:.0f} | {loop[0]:.0f} / "
                         f"{loop[1]:.0f} | {ring[0] - loop[0]:+.0f} / {ring[1] - loop[1]:+.0f} |")
        if lat.get("rounds"):
            added = ", ".join(f"{r['p99_us'] - r['loop_p99_us']:+.0f}" for r in lat["rounds"])
            lines += ["", f"Added p99 at paced arrivals, round by round (us): {added}."]
    return "\n".join(lines)


# --- main -------------------------------------------------------------------------------------

Step = tuple[int, str, Callable[[], Any], Callable[[Any], str]]


def steps(work: Path, args: argparse.Namespace, notes: list[str]) -> list[Step]:
    return [(1, "overhead", lambda: overhead.run(work, args.quick, args.repeats, notes,
                                                 SMG_VENV), overhead.report),
            (2, "streams", lambda: streams.run(work, args.quick, notes, SMG_VENV),
             streams.report),
            (3, "saturation", lambda: loadtests.scenario_saturation(work, args.quick),
             loadtests.report_saturation),
            (4, "routing", lambda: loadtests.scenario_routing(work, args.quick),
             loadtests.report_routing),
            (5, "ring", lambda: scenario_ring(Path(args.ring_json)), report_ring),
            (6, "apikeys", lambda: apikeys.run(work, args.quick, args.repeats),
             apikeys.report),
            (7, "workers", lambda: workers.run(work, args.quick, args.repeats), workers.report)]


def header(m: dict[str, Any], quick: bool) -> str:
    return (f"Measured {m['date']} at commit {m['commit']} on {m['cpu']} ({m['cpus']} CPUs, "
            f"load average {m['load']} at the start), Linux {m['kernel']}, Python "
            f"{m['python']}, gevent {m['gevent']}, Flask {m['flask']}, requests {m['requests']}"
            f", {m['nginx']}, {m['smg']}, {m['wrk']}. Everything on one machine: load "
            "generator, appliance, peers and simulated nodes share its CPUs"
            + (" (a --quick run: shorter, fewer cases)." if quick else "."))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="shorter runs: /v1/chat/completions only at 1 and 10 connections, "
                         "1 and 100 streams, shorter saturation and routing runs, 2 rounds "
                         "of 2 s for API keys and workers")
    ap.add_argument("--scenarios", default="1,2,3,4,5,6,7")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--ring-json", default=str(RESULTS / "ring.json"))
    ap.add_argument("--from-json", help="render report.md again from a report.json; run nothing")
    args = ap.parse_args()
    if args.from_json:
        return write_report(json.loads(Path(args.from_json).read_text()), [])
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # 1000 streams = 3000+ sockets
    RESULTS.mkdir(exist_ok=True)
    wanted = {int(s) for s in args.scenarios.split(",")}
    notes = missing_tools(wanted)
    for note in notes:
        print(f"make bench: {note}", file=sys.stderr, flush=True)
    report: dict[str, Any] = {"machine": machine(), "quick": args.quick, "notes": notes}
    sections: list[str] = []
    failed: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ollama-lb-bench-") as tmp:
        for number, key, run, render in steps(Path(tmp), args, notes):
            if number not in wanted or (number in WRK_SCENARIOS and not shutil.which("wrk")):
                continue
            print(f"running scenario {number} ({key})...", file=sys.stderr, flush=True)
            try:
                result = run()
            except Exception as exc:  # one broken scenario must not cost the others' figures
                failed.append(f"scenario {number} ({key}) failed: {type(exc).__name__}: "
                              f"{str(exc)[:400]}")
                notes.append(failed[-1])
                print(f"make bench: {failed[-1]}", file=sys.stderr, flush=True)
                continue
            if result is None:
                continue
            report[key] = result
            sections.append(render(result))
    report["machine"]["smg"] = machine()["smg"]  # installed during the run, perhaps
    (RESULTS / "report.json").write_text(json.dumps(report, indent=2, default=str))
    write_report(report, sections)
    return 1 if failed else 0  # the report is written either way


RENDER = {"overhead": overhead.report, "streams": streams.report,
          "saturation": loadtests.report_saturation, "routing": loadtests.report_routing,
          "ring": report_ring, "apikeys": apikeys.report, "workers": workers.report}


def write_report(report: dict[str, Any], sections: list[str]) -> int:
    """report.md from the figures (``sections`` already rendered, or rendered here)."""
    if not sections:
        sections = [render(report[key]) for key, render in RENDER.items() if report.get(key)]
    parts = [header(report["machine"], report.get("quick", False))]
    if report.get("notes"):
        parts.append("\n".join(f"- {n}" for n in report["notes"]))
    parts += [goals.render(report), *sections]
    text = "\n\n".join(parts) + "\n"
    (RESULTS / "report.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
