"""What one relayed stream line costs the appliance: Python calls, greenlet switches and CPU.

The per-line figure of scenario 2 divides the appliance's CPU by the lines it relayed, so each
stream's setup is spread over its 42 lines; this isolates the relay itself. The appliance runs
in this process in front of a simulated node (its own process) that streams long replies
quickly; the streaming client (``streamclient.py``) is a process of its own, so every call
counted here is the appliance's. After a warm-up, one round of N concurrent streams runs under
cProfile with ``greenlet.settrace`` counting switches, then the same round unprofiled for CPU.
Usage:

  .venv/bin/python tests/bench/profile_stream.py [--streams 50] [--tokens 400]
      [--rate 200] [--path /v1/chat/completions] [--top 30] [--dump out.prof] [--key]
"""
# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
from pathlib import Path
from typing import Any

import gevent
import greenlet

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # the repository, for app and pipeline

import procs
from profile_request import KEY, key_entry, start_appliance


def one_round(url: str, streams: int, path: str, key: bool) -> dict[str, Any]:
    """``streams`` concurrent streams from the client process; its summary."""
    args = [sys.executable, str(HERE / "streamclient.py"), url, str(streams), "m", "0.2", path]
    env = {**os.environ, **({"STREAM_KEY": KEY} if key else {})}
    p = subprocess.Popen(args, stdout=subprocess.PIPE, text=True, env=env)
    while p.poll() is None:  # the hub must run: the appliance lives in this process
        gevent.sleep(0.05)
    summary: dict[str, Any] = json.loads(p.communicate()[0])
    if summary["broken"]:
        raise RuntimeError(f"broken streams: {summary['broken_examples']}")
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--streams", type=int, default=50)
    ap.add_argument("--tokens", type=int, default=400)
    ap.add_argument("--rate", type=float, default=200.0, help="tokens per second per stream")
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--dump", help="write the cProfile data here")
    ap.add_argument("--key", action="store_true", help="an API key on every stream")
    ap.add_argument("--rounds", type=int, default=1,
                    help="unprofiled rounds measured for CPU (more for a sampling profiler)")
    args = ap.parse_args()
    node = procs.fake_node("m", "fast", num_parallel=4096, tokens_per_second=args.rate,
                           tokens=args.tokens, max_queue=4096)
    # a node cap above the round's streams: none of them queues (as in scenario 2)
    app = start_appliance(node.url, key_entry(False) if args.key else None,
                          caps=max(64, args.streams))
    url = f"http://127.0.0.1:{app.port}"
    switches = [0]

    def count(event: str, _args: Any) -> None:
        switches[0] += 1

    try:
        one_round(url, 5, args.path, args.key)  # warm-up
        prof = cProfile.Profile()
        greenlet.settrace(count)
        prof.enable()
        profiled = one_round(url, args.streams, args.path, args.key)
        prof.disable()
        greenlet.settrace(None)
        t0 = os.times()
        n = 0
        for _ in range(args.rounds):
            plain = one_round(url, args.streams, args.path, args.key)
            n += plain["lines"]
        t1 = os.times()
        user, system = t1.user - t0.user, t1.system - t0.system
    finally:
        app.shutdown(drain_s=0)
        node.stop()
    stats = pstats.Stats(prof)
    lines = profiled["lines"]
    print(f"{args.streams} streams x {args.tokens} tokens at {args.rate:g}/s on {args.path}"
          f"{' with a key' if args.key else ''}:")
    print(f"  Python calls per line   {stats.total_calls / lines:.1f}")  # type: ignore[attr-defined]
    print(f"  switches per line       {switches[0] / lines:.2f}")
    print(f"  CPU per line            {(user + system) / n * 1e6:.1f} us unprofiled "
          f"({user / n * 1e6:.1f} user, {system / n * 1e6:.1f} system)")
    print(f"  gap p99                 {plain['gap_p99_ms']} ms (node's {1000 / args.rate:.0f} ms)")
    if args.dump:
        stats.dump_stats(args.dump)
    text = io.StringIO()
    stats.stream = text  # type: ignore[attr-defined]
    stats.sort_stats("ncalls").print_stats(args.top)
    print(text.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
