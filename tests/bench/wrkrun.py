"""wrk as the load generator of the request/response scenario, and the statistics it feeds.

wrk (C, one thread, keep-alive connections) costs far less per request than any Python client
would, so on a 2-CPU machine the figures are the servers', not the load generator's. A run
whose replies were not all 2xx, or whose sockets failed, is reported as such: a fast error
page must never pass for throughput.
"""

from __future__ import annotations

import json
import re
import statistics
import subprocess
from pathlib import Path


def wrk(url: str, conns: int, seconds: float, body: str, workdir: Path,
        headers: dict[str, str] | None = None) -> dict[str, float]:
    """One wrk run POSTing ``body`` as JSON: req/s, p50/p99 (ms), requests, errors.
    ``headers`` go on every request (``-H``), e.g. an API key's ``Authorization``."""
    script = workdir / f"post-{abs(hash(body))}.lua"
    script.write_text('wrk.method = "POST"\n'
                      'wrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(body)}\n")
    extra = [arg for name, value in (headers or {}).items() for arg in ("-H", f"{name}: {value}")]
    out = subprocess.run(["wrk", "-t1", f"-c{conns}", f"-d{seconds}s", "--latency", *extra, "-s",
                          str(script), url], capture_output=True, text=True, timeout=seconds + 30)
    return parse(out.stdout)


def parse(text: str) -> dict[str, float]:
    """The figures of wrk's ``--latency`` report."""

    def dur(token: str) -> float:
        value, unit = re.match(r"([\d.]+)(us|ms|s)", token).groups()  # type: ignore[union-attr]
        return float(value) * {"us": 1e-3, "ms": 1.0, "s": 1e3}[unit]

    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", text, re.M))
    total = re.search(r"(\d+) requests in", text)
    if total is None or not lat:
        raise RuntimeError(f"wrk printed no figures: {text.strip()[:300]!r}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
                        text)
    return {"rps": float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1)),  # type: ignore
            "p50_ms": dur(lat["50"]), "p99_ms": dur(lat["99"]), "requests": int(total.group(1)),
            "non2xx": int(errors.group(1)) if errors else 0,
            "socket_errors": sum(int(g) for g in sockets.groups()) if sockets else 0}


def med(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> str:
    """``median (min-max)``, the form every repeated figure is reported in."""
    return f"{med(values):,.0f} ({min(values):,.0f}-{max(values):,.0f})"
