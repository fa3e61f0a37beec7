"""What the ring costs a request, in machine instructions counted by callgrind.

Wall time on a shared VM moves 20-50 % between runs of the ring benchmarks; instructions do
not. ``ringbench``'s factory (one node, no-op dispatch) is driven one of three ways and run
under ``valgrind --tool=callgrind`` at two request counts, so the difference divided by the
difference in requests is one request's cost without start-up and warm-up:

- ``serial``: one request at a time, each waited for in ``Ticket.result()`` (every stage
  parks and is woken for every request: the idle ring's cost)
- ``batched``: ``run_ring``, as many as the ring takes (the stages batch)
- ``loop``: the same six stage functions in a plain loop (no ring at all)

Usage:

  .venv/bin/python tests/bench/ringcount.py [--modes serial,batched,loop] [--wait blocking]
      [--low 1000 --high 3000]
"""
# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent.parent))  # this tree's pipeline, not an installed one

import callgrind
import ringbench as rb

RUNS = {"serial": rb.run_serial, "batched": rb.run_ring, "loop": rb.run_loop}


def run(mode: str, wait: str, n: int) -> None:
    """Warm up, then ``n`` requests driven as ``mode`` says."""
    factory = rb.make_factory(wait)
    try:
        rb.run_serial(factory, 500)
        RUNS[mode](factory, n)
    finally:
        factory.stop()


def instructions(mode: str, wait: str, n: int) -> int:
    """Instructions the whole run of ``n`` requests took under callgrind."""
    return callgrind.instructions([__file__, "--run", mode, "--wait", wait,
                                   "--requests", str(n)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", choices=RUNS, help="one plain run (what callgrind runs)")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--modes", default=",".join(RUNS))
    ap.add_argument("--wait", default="blocking")
    ap.add_argument("--low", type=int, default=1000)
    ap.add_argument("--high", type=int, default=3000)
    args = ap.parse_args()
    if args.run:
        run(args.run, args.wait, args.requests)
        return 0
    for mode in args.modes.split(","):
        low = instructions(mode, args.wait, args.low)
        high = instructions(mode, args.wait, args.high)
        per = (high - low) / (args.high - args.low)
        print(f"{mode:8s} {args.wait:9s} {per / 1000:8.1f}k instructions per request",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
