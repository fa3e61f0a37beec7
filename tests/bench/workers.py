"""Scenario 7: several worker processes, and what shared caps in Redis cost per request.

Three appliances in front of one fast simulated node, each with its own Redis key prefix:
local mode (``server.workers: 1``, no Redis: caps counted in the process, as before), Redis
mode with one worker (``sharedState.redisUrl``), and Redis mode with ``server.workers: 2``
(which needs the Redis URL: a master and two workers on one port). One ``redis-server`` on a
Unix socket with no persistence, as deploy/install.sh runs it, serves both Redis modes. The
harness starts it and skips the scenario with a note where redis-server is missing.

wrk drives each at 1 and 10 connections (and 50 in a full run, where two workers have enough
connections to spread), round by round in a rotating order. CPU per request
is summed over each appliance's whole process tree (master and workers); Redis's own CPU and
commands per request are read beside it (over each run, so the other appliances' heartbeats
land in them too: a few per second against hundreds of requests). Before and after the load
each Redis-mode appliance must report ``shared`` mode in its metrics, so the figures are of
caps counted in Redis, not of the local fallback.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import procs
import requests
from overhead import ENDPOINTS, measure
from wrkrun import med, spread, wrk

PATH, BODY = ENDPOINTS["chat"]
TARGETS = ("local", "redis, 1 worker", "redis, 2 workers")
LOCAL, SHARED1, SHARED2 = TARGETS
READS = 6
MODE = re.compile(r'^\w+_shared_mode\{mode="(\w+)"\} 1\.0$', re.M)


def shared_mode(url: str) -> str:
    """The mode the appliance's metrics report (``shared``, ``local``, ``rejoining``)."""
    found = MODE.findall(requests.get(url + "/metrics", timeout=5).text)
    return found[0] if found else "none"


def start(work: Path, redis: procs.Redis, node: procs.Proc,
          started: list[procs.Proc]) -> dict[str, procs.Proc]:
    shared = {"redisUrl": redis.url}
    configs: dict[str, dict[str, Any]] = {
        LOCAL: {},
        SHARED1: {"sharedState": {**shared, "keyPrefix": "bench1"}},
        SHARED2: {"sharedState": {**shared, "keyPrefix": "bench2"}, "server": {"workers": 2}},
    }
    targets = {}
    for name, sections in configs.items():
        targets[name] = procs.appliance([node], work, caps=1024, **sections)
        started.append(targets[name])
    procs.wait_log(targets[SHARED2], "workers_ready")
    return targets


def check_modes(targets: dict[str, procs.Proc], timeout: float = 0) -> dict[str, str]:
    """Every Redis-mode appliance reports ``shared`` on ``READS`` reads in a row (new
    connections, so with two workers both answer), within ``timeout``; raises otherwise.
    An instance starts ``rejoining`` and turns ``shared`` after a few heartbeats."""
    deadline = time.monotonic() + timeout
    while True:
        modes = {name: sorted({shared_mode(targets[name].url) for _ in range(READS)})
                 for name in (SHARED1, SHARED2)}
        if all(m == ["shared"] for m in modes.values()):
            return {name: "shared" for name in modes}
        if time.monotonic() > deadline:
            raise RuntimeError(f"not every Redis-mode appliance counts its caps in Redis: "
                               f"{modes}")
        time.sleep(0.2)


def one_run(proc: procs.Proc, redis: procs.Redis, conns: int, seconds: float,
            work: Path) -> dict[str, float]:
    """One wrk run, with Redis's CPU, commands and scripts over it, per request."""
    cpu0, calls0 = redis.cpu_seconds(), redis.command_calls()
    each0 = {pid: procs.cpu_seconds_of(pid) for pid in procs.tree_pids(proc.pid)}
    r = measure(proc, PATH, conns, seconds, BODY, work)
    each = [procs.cpu_seconds_of(pid) - c for pid, c in each0.items()]
    r["busiest_share"] = max(each) / max(1e-9, sum(each))  # 2 workers: ~0.5 when both serve
    calls = redis.command_calls()
    delta = {k: v - calls0.get(k, 0) for k, v in calls.items() if k != "info"}  # not ours
    n = max(1, r["requests"])
    r["redis_cpu_us"] = (redis.cpu_seconds() - cpu0) / n * 1e6
    r["redis_cmds"] = sum(delta.values()) / n
    r["redis_scripts"] = (delta.get("evalsha", 0) + delta.get("eval", 0)) / n
    return r


def run(work: Path, quick: bool, repeats: int) -> dict[str, Any] | None:
    binary = procs.redis_binary()
    if binary is None:
        return None  # missing_tools has said so in the notes
    redis = procs.Redis(binary, work)
    node = procs.fake_node("m", "fast", num_parallel=1024)
    started: list[procs.Proc] = [node]
    try:
        targets = start(work, redis, node, started)
        modes = check_modes(targets, timeout=30)
        processes = {name: len(procs.tree_pids(p.pid)) for name, p in targets.items()}
        for proc in targets.values():  # warm-up (pools, lazy imports), not counted
            wrk(proc.url + PATH, 10, 1, BODY, work)
        rounds, seconds = (2, 2) if quick else (max(3, repeats + 2), 4)
        cells = []
        for conns in (1, 10) if quick else (1, 10, 50):
            runs: dict[str, dict[str, list[float]]] = {name: {} for name in TARGETS}
            for i in range(rounds):
                for name in TARGETS[i % 3:] + TARGETS[:i % 3]:
                    for k, v in one_run(targets[name], redis, conns, seconds, work).items():
                        runs[name].setdefault(k, []).append(v)
            cells.append({"conns": conns, "runs": runs})
        check_modes(targets)  # still counted in Redis at the end
    finally:
        for p in reversed(started):
            p.stop()
        redis.stop()
    return {"cells": cells, "rounds": rounds, "seconds": seconds, "modes": modes,
            "processes": processes}


def _cell(res: dict[str, Any], conns: int) -> dict[str, dict[str, list[float]]]:
    return next(c["runs"] for c in res["cells"] if c["conns"] == conns)


def _errors(r: dict[str, list[float]]) -> int:
    return int(sum(r["non2xx"]) + sum(r["socket_errors"]))


def _throughput_rows(res: dict[str, Any]) -> list[str]:
    rows = []
    for cell in res["cells"]:
        if cell["conns"] < 10:
            continue
        base = med(cell["runs"][LOCAL]["rps"])
        for name in TARGETS:
            r = cell["runs"][name]
            redis = (f"{med(r['redis_cpu_us']):.0f} | {med(r['redis_scripts']):.2f} / "
                     f"{med(r['redis_cmds']):.1f}" if name != LOCAL else "- | -")
            rows.append(f"| {cell['conns']} | {name} | {res['processes'][name]} | "
                        f"{spread(r['rps'])} | {med(r['rps']) / base:.2f}x | "
                        f"{spread(r['cpu_us'])} | {med(r['busiest_share']):.0%} | {redis} |")
    return rows


def _latency_rows(res: dict[str, Any]) -> list[str]:
    rows = []
    for conns in (1, 10):
        c = _cell(res, conns)
        p = {name: (med(c[name]["p50_ms"]), med(c[name]["p99_ms"])) for name in TARGETS}
        rows.append(f"| {conns} | {p[LOCAL][0]:.2f} / {p[LOCAL][1]:.2f} | "
                    f"{p[SHARED1][0]:.2f} / {p[SHARED1][1]:.2f} | "
                    f"{p[SHARED1][0] - p[LOCAL][0]:+.2f} / {p[SHARED1][1] - p[LOCAL][1]:+.2f} | "
                    f"{p[SHARED2][0]:.2f} / {p[SHARED2][1]:.2f} |")
    return rows


def report(res: dict[str, Any]) -> str:
    errors = ", ".join(f"{name} {n}" for name in TARGETS
                       if (n := sum(_errors(c["runs"][name]) for c in res["cells"]))) or "0"
    lines = [f"### 7. Several workers and shared caps (wrk `{PATH}`, fast node, "
             f"{res['seconds']} s x {res['rounds']} rounds per connection count in rotating "
             "order; median (min-max))", "",
             "| conns | mode | processes | req/s | vs local | CPU/req, appliance tree (us) | "
             "busiest process's share of it | Redis CPU/req (us) | Redis scripts / commands "
             "per req |", "|---" * 9 + "|", *_throughput_rows(res), "",
             "| conns | local p50 / p99 (ms) | redis, 1 worker p50 / p99 (ms) | added by "
             "Redis mode p50 / p99 (ms) | redis, 2 workers p50 / p99 (ms) |",
             "|---|---|---|---|---|", *_latency_rows(res)]
    lines += ["", "Processes: the appliance's process tree (2 workers: the master and its "
              "workers), all of whose CPU is counted; the busiest process's share shows how "
              "evenly the kernel spread wrk's kept-alive connections over the workers (50 % is "
              "even). Redis: one `redis-server` on a Unix socket (`--save '' --appendonly no`) "
              "for both Redis modes, each with its own key prefix; its CPU is not in the "
              "appliance column. Scripts: `EVALSHA` calls (the lease acquire); commands: every "
              "command Redis ran, those inside the scripts included (`INFO commandstats`). "
              "Modes reported by the appliances' metrics before and after the load: "
              + ", ".join(f"{k} {v}" for k, v in res["modes"].items())
              + f". Non-2xx or socket errors over all runs: {errors}."]
    return "\n".join(lines)
