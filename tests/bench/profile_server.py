"""Where the appliance's CPU goes while it serves wrk: a py-spy sample, summed by layer.

``profile_request.py`` counts calls deterministically but cProfile distorts time; this
samples the real server process (py-spy, from outside, ``--nonblocking`` so the process is
never paused) while ``wrk -c10`` posts to ``/v1/chat/completions`` through it in front of a
simulated node. Each sample is charged to the innermost frame that belongs to a known layer
(a socket send called by urllib3 counts as gevent's socket I/O, urllib3's own code as the
upstream client), so the shares add up to 100 % of the appliance's busy samples; idle samples
(the hub waiting in epoll) are not taken. py-spy is installed into bench-results/.pyspy-venv
on first use. Usage:

  .venv/bin/python tests/bench/profile_server.py [--seconds 10] [--conns 10] [--path P]
      [--raw bench-results/pyspy.txt]
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import overhead  # noqa: E402  (after the path above)
import procs  # noqa: E402
import toolvenv  # noqa: E402

VENV = Path("bench-results/.pyspy-venv")
PIN = "0.4.3"
#: (layer, pattern on the frame's file as py-spy prints it, relative to its sys.path entry);
#: the first layer the innermost matching frame fits wins
LAYERS = [(name, re.compile(r"(^|/)" + pattern)) for name, pattern in [
    ("ring: wait, barrier, sequence, ring, stage",
     r"pipeline/(wait|barrier|sequence|ring|stage)\."),
    ("pipeline: admission, routing, dispatch, ledger, metrics", r"pipeline/"),
    ("appliance shell: app/ views, gate, transport", r"app/"),
    ("upstream client: urllib3", r"urllib3/"),
    ("upstream client: http.client", r"http/client\.py"),
    ("header parsing: email package", r"email/"),
    ("Flask + werkzeug", r"(flask|werkzeug|blinker)/"),
    ("pywsgi (server side HTTP)", r"gevent/pywsgi\.py"),
    ("json", r"json/"),
    ("prometheus_client", r"prometheus_client/"),
    ("gevent: hub, greenlets, timers, socket I/O", r"gevent/"),
]]
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]+)(?::\d+)?\)$")


def layer_of(stack: list[str]) -> str:
    """The layer of the innermost frame (the last in py-spy's raw order) that has one."""
    for frame in reversed(stack):
        m = _FRAME.match(frame)
        path = m.group("file") if m else frame
        for name, pattern in LAYERS:
            if pattern.search(path):
                return name
    return "other (stdlib, builtins)"


def summarise(raw: str) -> tuple[collections.Counter[str], collections.Counter[str], int]:
    """Samples by layer and by leaf function, and the total, from py-spy's raw output."""
    layers: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack_text, _, count_text = line.rpartition(" ")
        if not count_text.isdigit():
            continue
        count = int(count_text)
        stack = stack_text.split(";")
        layers[layer_of(stack)] += count
        leaves[stack[-1]] += count
        total += count
    return layers, leaves, total


def record(args: argparse.Namespace, spy: Path, work: Path, raw: Path) -> dict[str, float]:
    """wrk through the appliance while py-spy samples it; the appliance's CPU per request."""
    node = procs.fake_node("m", "fast", num_parallel=1024)
    lb = procs.appliance([node], work, caps=1024)
    try:
        path = args.path
        body = next(b for p, b in overhead.ENDPOINTS.values() if p == path)
        overhead.measure(lb, path, args.conns, 2, body, work)  # warm-up
        spy_proc = subprocess.Popen([str(spy), "record", "--pid", str(lb.pid), "--rate", "250",
                                     "--duration", str(args.seconds), "--format", "raw",
                                     "--nonblocking", "--output", str(raw)],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)  # py-spy attaches before the load starts
        r = overhead.measure(lb, path, args.conns, args.seconds, body, work)
        _, err = spy_proc.communicate(timeout=args.seconds + 60)
        if spy_proc.returncode != 0:
            raise RuntimeError(f"py-spy failed: {err.strip()[-300:]}")
        return r
    finally:
        lb.stop()
        node.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--conns", type=int, default=10)
    ap.add_argument("--path", default="/v1/chat/completions",
                    choices=[p for p, _ in overhead.ENDPOINTS.values()])
    ap.add_argument("--raw", help="keep py-spy's raw (collapsed stack) output here")
    args = ap.parse_args()
    if not shutil.which("wrk"):
        print("wrk is missing (Debian package `wrk`)", file=sys.stderr)
        return 2
    spy, why = toolvenv.ensure(VENV, "py-spy", PIN, "py-spy")
    if spy is None:
        print(f"py-spy cannot be had: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="ollama-lb-spy-") as tmp:
        raw = Path(args.raw) if args.raw else Path(tmp) / "raw.txt"
        r = record(args, spy, Path(tmp), raw)
        layers, leaves, total = summarise(raw.read_text(errors="replace"))
    print(f"{args.path}, wrk -c{args.conns} for {args.seconds} s: {r['rps']:,.0f} req/s, "
          f"{r['cpu_us']:.0f} us of appliance CPU per request, {total} busy samples")
    for name, n in layers.most_common():
        print(f"  {n / max(1, total) * 100:5.1f} %  {name}")
    print("busiest leaf functions:")
    for name, n in leaves.most_common(12):
        print(f"  {n / max(1, total) * 100:5.1f} %  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
