"""``ollama-lb``: serve (the default), check-config, fake-node, demo, hash-key, new-key.

gevent must patch the standard library before anything imports socket, ssl, requests or
Flask, so the patch is the first statement here and in ``app/__main__.py``.
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)  # watchdog: see app/reload.py

import argparse
import sys
from collections.abc import Sequence

COMMANDS = ("serve", "check-config", "fake-node", "demo", "hash-key", "new-key")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ollama-lb", description="A load balancer for Ollama.")
    sub = p.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the appliance (the default command)")
    serve.add_argument("config", help="path to config.yaml")
    serve.add_argument("--host", help="override server.host")
    serve.add_argument("--port", type=int, help="override server.port")
    serve.add_argument("--no-watch", action="store_true", help="do not watch the config file")
    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("config")
    fake = sub.add_parser("fake-node", help="run a simulated Ollama node")
    fake.add_argument("--port", type=int, default=11434)
    fake.add_argument("--host", default="127.0.0.1")
    fake.add_argument("--models", default="llama3.2,all-minilm",
                      help="comma-separated model names")
    fake.add_argument("--profile", choices=("realistic", "fast"), default="realistic")
    fake.add_argument("--num-parallel", type=int, help="OLLAMA_NUM_PARALLEL slots per model")
    fake.add_argument("--tokens-per-second", type=float, help="decode rate per stream")
    fake.add_argument("--load-seconds", type=float, help="cold model load time")
    fake.add_argument("--max-loaded-models", type=int, help="OLLAMA_MAX_LOADED_MODELS")
    fake.add_argument("--max-queue", type=int, help="OLLAMA_MAX_QUEUE")
    fake.add_argument("--tokens", type=int, help="reply length without num_predict")
    fake.add_argument("--prefill-tps", type=float, help="prompt tokens per second")
    fake.add_argument("--keep-alive-seconds", type=float, help="OLLAMA_KEEP_ALIVE")
    fake.add_argument("--fail", default="none", help="fault mode: hang, reset, "
                      "reset-mid-stream, error-mid-stream, 500, 503, malformed, flap, refuse")
    fake.add_argument("--fault-api", action="store_true",
                      help="serve the /_fake/stats and /_fake/fault control routes (off: 404)")
    fake.add_argument("--library", help="comma-separated models the registry has for pulls "
                      "(default: any validly named model)")
    fake.add_argument("--pull-mbps", type=float, help="pull/push transfer rate in MB/s")
    hashk = sub.add_parser("hash-key", help="print the config `hash` of an API key")
    hashk.add_argument("key", nargs="?", default="-",
                       help="the key; '-' or nothing: read it from stdin (keeps it out of "
                       "shell history and the process list)")
    newk = sub.add_parser("new-key", help="print a fresh random API key and its config entry")
    newk.add_argument("name", help="the key's name (in logs, metrics and /admin/usage)")
    newk.add_argument("--scopes", default="inference",
                      help="comma-separated: inference, manage, admin (default: inference)")
    newk.add_argument("--models", help="comma-separated model globs the key may use")
    demo = sub.add_parser("demo", help="the appliance in front of three simulated nodes")
    demo.add_argument("--port", type=int, default=8080)
    demo.add_argument("--profile", choices=("realistic", "fast"), default="realistic")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] not in COMMANDS and not args_in[0].startswith("-"):
        args_in.insert(0, "serve")  # `ollama-lb config.yaml`, as the Java original took it
    args = _parser().parse_args(args_in)
    if args.command == "check-config":
        return check_config(args.config)
    if args.command == "fake-node":
        from app.fakenode.server import serve_forever

        serve_forever([m for m in args.models.split(",") if m], args.port, args.host,
                      args.profile, args.fail, fault_api=args.fault_api,
                      library=args.library.split(",") if args.library else None,
                      pull_bps=args.pull_mbps * 1e6 if args.pull_mbps is not None else None,
                      num_parallel=args.num_parallel,
                      decode_tps=args.tokens_per_second, load_s=args.load_seconds,
                      max_loaded=args.max_loaded_models, max_queue=args.max_queue,
                      tokens=args.tokens, prefill_tps=args.prefill_tps,
                      keep_alive_s=args.keep_alive_seconds)
        return 0
    if args.command == "hash-key":
        return hash_key(args.key)
    if args.command == "new-key":
        return new_key(args.name, args.scopes, args.models)
    if args.command == "demo":
        from app.demo import run_demo

        return run_demo(args.port, args.profile)
    return serve(args.config, args.host, args.port, not args.no_watch)


def check_config(path: str) -> int:
    from pipeline.config import ConfigError, load_config

    try:
        cfg = load_config(path)
    except ConfigError as exc:
        print(f"{path}: invalid config", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    print(f"{path}: OK ({len(cfg.nodes)} node(s), strategy {cfg.strategy.type}, "
          f"listening on {cfg.server.host}:{cfg.server.port})")
    return 0


def hash_key(key: str) -> int:
    from app.keys import hash_key as digest

    if key == "-":
        key = sys.stdin.readline().rstrip("\r\n")
    if not key:
        print("hash-key: empty key", file=sys.stderr)
        return 2
    print(digest(key))
    return 0


def new_key(name: str, scopes: str, models: str | None) -> int:
    """A key with 256 bits of entropy, and the entry that goes under security.apiKeys."""
    import json

    from app.keys import hash_key as digest
    from app.keys import new_key as fresh
    from pipeline.config import ConfigError, parse_config

    key = fresh()
    entry: dict[str, object] = {"name": name, "hash": digest(key),
                                "scopes": [s.strip() for s in scopes.split(",") if s.strip()]}
    if models:
        entry["models"] = [m.strip() for m in models.split(",") if m.strip()]
    try:
        parse_config({"security": {"apiKeys": [entry]}})
    except ConfigError as exc:
        print("new-key: " + "; ".join(exc.problems), file=sys.stderr)
        return 2
    print(f"# the key (give it to the client; it is not stored anywhere, keep it secret):\n"
          f"#   {key}\n# the config entry, under security.apiKeys:")
    print(f"- name: {json.dumps(name)}\n  hash: {json.dumps(entry['hash'])}")
    for field in ("scopes", "models"):
        if field in entry:
            print(f"  {field}: {json.dumps(entry[field])}")
    return 0


def serve(path: str, host: str | None, port: int | None, watch: bool) -> int:
    from app.master import maybe_run_master  # server.workers > 1: a pre-fork master
    from app.server import OllamaLoadBalancerApplication
    from pipeline.config import ConfigError

    if (status := maybe_run_master(path, host, port, watch)) is not None:
        return status
    try:
        app = OllamaLoadBalancerApplication(path, host=host, port=port, watch=watch,
                                            install_signals=True).start()
    except ConfigError as exc:
        print(f"{path}: invalid config, not starting", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"cannot start: {exc}", file=sys.stderr)
        return 1
    app.await_shutdown()
    return app.exit_status  # 0, or EXIT_STREAMS_CUT (75) when the drain bound cut requests


if __name__ == "__main__":
    sys.exit(main())
