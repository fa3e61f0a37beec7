"""What an API key adds to one proxied request, in Python calls and in machine instructions.

Python call counts (``profile_request.py``) miss work done inside C functions: a digest, a
regex, a JSON parse each count as one call whatever they cost. Instructions do not: this
script runs ``N`` sequential requests of one kind (no key, a key, a key with a models
allow-list) through ``profile_request``'s appliance and raw client, and ``--callgrind`` runs it
under ``valgrind --tool=callgrind`` at two request counts, so the difference divided by the
difference in requests is the cost of one request without start-up and warm-up. Usage:

  .venv/bin/python tests/bench/profile_keys.py --callgrind [--low 200 --high 800]
      [--modes none,key,models] [--out DIR] [--json FILE]   # instructions per request per mode
  .venv/bin/python tests/bench/profile_keys.py --mode key --requests 300   # one run, plain

The per-function profile of the high run is left in ``DIR`` (``callgrind_annotate`` reads it).
"""
# ruff: noqa: E402  (gevent must patch the standard library before anything imports it)

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import callgrind
import procs
from profile_request import KEY, key_entry, raw_client, start_appliance

MODES = ("none", "key", "models")


def run(mode: str, n: int, path: str) -> None:
    """Warm up, then ``n`` sequential requests of ``mode``."""
    key = None if mode == "none" else KEY
    node = procs.fake_node("m", "fast", num_parallel=64)
    app = start_appliance(node.url, key_entry(mode == "models") if key else None)
    try:
        raw_client(app.port, path, 50, key)
        raw_client(app.port, path, n, key)
    finally:
        app.shutdown(drain_s=0)
        node.stop()


def instructions(mode: str, n: int, path: str, out: Path) -> int:
    """Instructions the whole run of ``n`` requests took under callgrind."""
    return callgrind.instructions([__file__, "--mode", mode, "--requests", str(n),
                                   "--path", path], dump=str(out / f"callgrind.{mode}.{n}"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", choices=MODES, default="none")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--path", default="/v1/chat/completions")
    ap.add_argument("--callgrind", action="store_true")
    ap.add_argument("--low", type=int, default=200)
    ap.add_argument("--high", type=int, default=800)
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--out", default="/tmp/profile_keys")
    ap.add_argument("--json", help="also write {mode: instructions per request} here")
    args = ap.parse_args()
    if not args.callgrind:
        run(args.mode, args.requests, args.path)
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    base, found = None, {}
    for mode in args.modes.split(","):
        low = instructions(mode, args.low, args.path, out)
        high = instructions(mode, args.high, args.path, out)
        per = found[mode] = (high - low) / (args.high - args.low)
        base = per if base is None else base
        print(f"{mode:7s} {per / 1000:8.1f}k instructions per request"
              f" ({(per / base - 1) * 100:+.1f} %)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(found))
    return 0


if __name__ == "__main__":
    sys.exit(main())
