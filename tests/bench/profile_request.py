"""Where one proxied non-streamed request spends its time: calls and greenlet switches per request.

Throughput on a shared 2-CPU machine moves by 30-50 % between runs; the number of Python
calls and of greenlet switches a request costs does not (at one client it is the same to a few
calls from run to run), so this is the figure to compare a change by. The appliance runs in
this process (in front of a simulated node in its own process, ``fast`` profile), driven by a
raw keep-alive client (one greenlet, a hand-written HTTP/1.1 exchange, ~10 calls per request
of its own, included in the counts); after a warm-up, N sequential requests run under cProfile
with ``greenlet.settrace`` counting every switch. Then the same N run unprofiled for CPU per
request (appliance and client together; the node is not counted). Usage:

  .venv/bin/python tests/bench/profile_request.py [--path /v1/chat/completions]
      [--requests 300] [--top 25] [--dump out.prof] [--json out.json] [--key [--models]]
      [--redis-url URL]

The ``.prof`` file opens in ``snakeviz`` or ``python -m pstats``. For a sampling profile of
the appliance as a server, under wrk, use py-spy instead (see tests/bench/performance.md).
"""
# ruff: noqa: E402, I001  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import collections
import cProfile
import hashlib
import io
import json
import pstats
import socket
import sys
import time
from pathlib import Path
from typing import Any

import greenlet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repository, for app and pipeline

import procs
from app.server import OllamaLoadBalancerApplication
from pipeline.config import parse_config


#: the Disruptor's own modules: their calls are what waiting and signalling cost
RING_MODULES = tuple(f"pipeline/{m}.py" for m in ("wait", "barrier", "sequence", "ring", "stage"))


def body_for(path: str) -> bytes:
    if path.startswith("/v1"):
        return json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}
                          ).encode()
    return json.dumps({"model": "m", "prompt": "hi", "stream": False}).encode()


KEY = "profile-key-0123456789abcdef0123456789abcdef"


def raw_client(port: int, path: str, n: int, key: str | None = None) -> None:
    """``n`` sequential POSTs on one kept-alive connection, each reply read whole."""
    body = body_for(path)
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    req = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
           f"{auth}Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        for _ in range(n):
            s.sendall(req)
            status = f.readline()
            if b" 200 " not in status:
                raise RuntimeError(f"the appliance answered {status!r}")
            length = 0
            while (h := f.readline()) not in (b"\r\n", b""):
                if h.lower().startswith(b"content-length"):
                    length = int(h.split(b":")[1])
            f.read(length)


def key_entry(models: bool) -> dict[str, Any]:
    """A key as scenario 6 of the harness configures it (a bucket taken from, never refusing)."""
    entry: dict[str, Any] = {"name": "profile", "scopes": ["inference"],
                             "hash": "sha256:" + hashlib.sha256(KEY.encode()).hexdigest(),
                             "requestsPerMinute": 10_000_000}
    return entry | ({"models": ["m*"]} if models else {})


def start_appliance(node_url: str, key: dict[str, Any] | None = None,
                    redis_url: str | None = None, caps: int = 64) -> OllamaLoadBalancerApplication:
    cfg = parse_config({**({"security": {"apiKeys": [key]}} if key else {}),
                        **({"sharedState": {"redisUrl": redis_url}} if redis_url else {}),
        "server": {"host": "127.0.0.1", "port": 0},
        "nodes": [{"id": "n0", "url": node_url, "models": ["m"], "maxConcurrentRequests": caps}],
        "healthCheck": {"enabled": False, "discovery": False},
        "logging": {"level": "WARNING"}})
    return OllamaLoadBalancerApplication(cfg, watch=False, health_checks=False).start()


def profiled(port: int, path: str, n: int, key: str | None) -> tuple[pstats.Stats, int, float]:
    """The profile of ``n`` requests, the greenlet switches they took, and their CPU."""
    switches = [0]

    def count(event: str, args: Any) -> None:
        switches[0] += 1

    prof = cProfile.Profile()
    greenlet.settrace(count)
    prof.enable()
    t0 = time.process_time()
    try:
        raw_client(port, path, n, key)
    finally:
        cpu = time.process_time() - t0
        prof.disable()
        greenlet.settrace(None)
    return pstats.Stats(prof), switches[0], cpu


def group(filename: str) -> str:
    """A function's package: site-packages name, ``stdlib:<module>``, or the repo path."""
    if filename == "~":
        return "builtins (C functions and methods)"
    if "site-packages/" in filename:
        return filename.split("site-packages/")[-1].split("/")[0]
    if "/lib/python3" in filename:
        return "stdlib:" + filename.rsplit("/", 1)[-1]
    root = str(HERE.parent.parent) + "/"
    return filename.removeprefix(root) if filename.startswith(root) else filename


def summary(stats: pstats.Stats, switches: int, cpu: float, n: int) -> dict[str, Any]:
    raw: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    by_group: collections.Counter[str] = collections.Counter()
    sleeps = waits = 0
    for (filename, _, func), (_, ncalls, *_rest) in raw.items():
        by_group[group(filename)] += ncalls
        if func == "sleep" and filename.endswith("gevent/hub.py"):
            sleeps += ncalls
        if filename.endswith(RING_MODULES):
            waits += ncalls
    total = stats.total_calls  # type: ignore[attr-defined]
    return {"requests": n, "calls_per_request": total / n, "switches_per_request": switches / n,
            "gevent_sleep_per_request": sleeps / n, "ring_calls_per_request": waits / n,
            "cpu_us_per_request_profiled": cpu / n * 1e6,
            "calls_per_request_by_package": {k: round(v / n, 1)
                                             for k, v in by_group.most_common(30)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--top", type=int, default=25, help="functions listed by own time")
    ap.add_argument("--dump", help="write the cProfile data here")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("--key", action="store_true", help="an API key on every request")
    ap.add_argument("--models", action="store_true", help="the key has a models allow-list")
    ap.add_argument("--redis-url", help="shared caps through this running Redis (Redis mode)")
    args = ap.parse_args()
    key = KEY if args.key or args.models else None
    node = procs.fake_node("m", "fast", num_parallel=64)
    app = start_appliance(node.url, key_entry(args.models) if key else None, args.redis_url)
    try:
        raw_client(app.port, args.path, 50, key)  # warm-up: connection pools, caches, imports
        stats, switches, cpu = profiled(app.port, args.path, args.requests, key)
        t0 = time.process_time()
        raw_client(app.port, args.path, args.requests, key)
        plain = (time.process_time() - t0) / args.requests * 1e6
    finally:
        app.shutdown(drain_s=0)
        node.stop()
    out = summary(stats, switches, cpu, args.requests) | {
        "cpu_us_per_request": plain,
        "path": args.path + (" with a key" if key else "") + (" (models list)" if args.models
                                                              else "")}
    if args.dump:
        stats.dump_stats(args.dump)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(render(out, stats, args.top))
    return 0


def render(out: dict[str, Any], stats: pstats.Stats, top: int) -> str:
    lines = [f"{out['path']}, {out['requests']} sequential requests at one client:",
             f"  Python calls per request      {out['calls_per_request']:.0f}",
             f"  greenlet switches per request {out['switches_per_request']:.0f}",
             f"  gevent.sleep per request      {out['gevent_sleep_per_request']:.1f}",
             f"  ring calls per request        {out['ring_calls_per_request']:.1f} (wait, "
             "barrier, sequence, ring, stage)",
             f"  CPU per request               {out['cpu_us_per_request']:.0f} us unprofiled, "
             f"{out['cpu_us_per_request_profiled']:.0f} us under cProfile", "",
             "calls per request by package:"]
    lines += [f"  {v:8.1f}  {k}" for k, v in out["calls_per_request_by_package"].items()]
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    return "\n".join(lines) + "\n\n" + text.getvalue()


if __name__ == "__main__":
    sys.exit(main())
