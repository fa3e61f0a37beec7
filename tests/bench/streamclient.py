"""A lean gevent streaming client: N concurrent streams, each line timed as it arrives.

Raw sockets and a hand-rolled chunked reader, so that the client's own cost stays small next
to what is measured. Run as a process by the harness
(``python streamclient.py URL N [MODEL] [RAMP_S] [PATH]``), it prints one JSON summary;
``one_stream`` is also used in-process by the routing scenario. A path under ``/v1`` is an
OpenAI chat stream (SSE, ended by ``data: [DONE]``), anything else an Ollama NDJSON stream
(ended by a line with ``"done": true``); each non-blank line is one timed line.
"""

from gevent import monkey

monkey.patch_all(thread=False, queue=False, select=False)

import json
import os
import socket
import sys
import time
from typing import Any
from urllib.parse import urlsplit

import gevent

KEY = os.environ.get("STREAM_KEY", "")  # an API key for every stream, if set


def one_stream(url: str, path: str, body: bytes, timeout: float = 120) -> dict[str, Any]:
    """POST and read the chunked reply line by line; times are perf_counter seconds."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    out: dict[str, Any] = {"status": 0, "times": [], "done": False, "error": None,
                           "last": b"", "start": time.perf_counter()}
    try:
        with gevent.Timeout(timeout), socket.create_connection((host, port)) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            auth = f"Authorization: Bearer {KEY}\r\n" if KEY else ""
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
                         f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                         f"Connection: close\r\n\r\n".encode() + body)
            f = sock.makefile("rb")
            out["status"] = int(f.readline().split()[1])
            chunked = False
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"transfer-encoding: chunked"):
                    chunked = True
            pending = b""
            while True:
                if chunked:
                    size = int(f.readline().split(b";")[0], 16)
                    if size == 0:
                        break
                    data = f.read(size)
                    f.read(2)
                else:
                    data = f.read1(65536)
                    if not data:
                        break
                now = time.perf_counter()
                pending += data
                while b"\n" in pending:
                    line, pending = pending.split(b"\n", 1)
                    if line.strip():
                        out["times"].append(now)
                        out["last"] = line
            out["done"] = finished(out["last"])
    except (OSError, ValueError, gevent.Timeout) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"
    out["last"] = out["last"][:200].decode(errors="replace")
    return out


def finished(last: bytes) -> bool:
    """Did the stream end the way its format ends a complete reply?"""
    return (last.strip() == b"data: [DONE]" or b'"done": true' in last
            or b'"done":true' in last)


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def summarise(results: list[dict[str, Any]], stall_s: float = 1.0) -> dict[str, Any]:
    ttft = [r["times"][0] - r["start"] for r in results if r["times"]]
    gaps = [b - a for r in results for a, b in zip(r["times"], r["times"][1:], strict=False)]
    stalled = sum(1 for r in results if any(
        b - a > stall_s for a, b in zip(r["times"], r["times"][1:], strict=False)))
    broken = [r for r in results if r["error"] or r["status"] != 200 or not r["done"]]
    return {"streams": len(results), "lines": sum(len(r["times"]) for r in results),
            "ttft_p50_ms": _ms(pct(ttft, 50)),
            "ttft_p99_ms": _ms(pct(ttft, 99)), "gap_p50_ms": _ms(pct(gaps, 50)),
            "gap_p99_ms": _ms(pct(gaps, 99)), "gap_max_ms": _ms(max(gaps, default=None)),
            "stalled": stalled, "broken": len(broken),
            "broken_examples": [r["error"] or r["last"] for r in broken[:3]]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def main() -> None:
    url, n = sys.argv[1], int(sys.argv[2])
    model = sys.argv[3] if len(sys.argv) > 3 else "m"
    ramp = float(sys.argv[4]) if len(sys.argv) > 4 else 0.5  # spread connects over this
    path = sys.argv[5] if len(sys.argv) > 5 else "/api/chat"
    request: dict[str, Any] = {"model": model,
                               "messages": [{"role": "user", "content": "hello"}]}
    if path.startswith("/v1"):
        request["stream"] = True  # OpenAI's default is a complete reply
    body = json.dumps(request).encode()

    def start(i: int) -> dict[str, Any]:
        gevent.sleep(ramp * i / max(1, n))
        return one_stream(url, path, body)

    jobs = [gevent.spawn(start, i) for i in range(n)]
    gevent.joinall(jobs)
    print(json.dumps(summarise([j.value for j in jobs])))


if __name__ == "__main__":
    main()
