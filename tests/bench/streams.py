"""Scenario 2: many concurrent token streams relayed, beside the same streams read directly.

OpenAI chat streams (``/v1/chat/completions``, SSE) because every target serves them, smg
included: the node directly, the appliance, nginx and smg, one after the other against the
same simulated node (40 tokens at 20 tokens/s per stream, i.e. one line every 50 ms). The
client (``streamclient.py``, its own process) times every line as it arrives. Per proxy: added
time to first token (its p99 minus the direct p99), gaps between lines, peak RSS of its
process tree, and its CPU over the run divided by the lines it relayed (so per-stream setup is
included, amortised over the stream's 42 lines). The 1,000-stream count runs ``ROUNDS``
times, the targets in turn each round, and reports each figure's median (``merged``).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import procs
import smgpeer

HERE = Path(__file__).resolve().parent
PATH = "/v1/chat/completions"
PROXIES = ("appliance", "nginx", "smg")
TOKENS, RATE = 40, 20
ROUNDS = 3  # of the 1,000-stream runs, interleaved across the targets
#: the least CPU time (s) worth dividing: /proc/PID/stat counts in clock ticks (10 ms)
MIN_CPU_S = 0.05


def run_streams(url: str, n: int, watch: procs.Proc | None = None) -> dict[str, Any]:
    """``n`` streams from a client process; peak RSS and CPU of ``watch`` meanwhile."""
    cpu0 = watch.cpu_seconds() if watch else 0.0
    p = subprocess.Popen([sys.executable, str(HERE / "streamclient.py"), url, str(n), "m",
                          str(min(1.0, n / 500)), PATH], stdout=subprocess.PIPE, text=True)
    peak = 0.0
    deadline = time.monotonic() + 300
    while p.poll() is None and time.monotonic() < deadline:
        if watch is not None:
            peak = max(peak, watch.rss_mb())
        time.sleep(0.1)
    if p.poll() is None:
        p.kill()
    out: dict[str, Any] = json.loads(p.communicate()[0] or '{"streams": 0, "lines": 0}')
    if watch is not None:
        out["rss_peak_mb"] = round(peak, 1)
        cpu = watch.cpu_seconds() - cpu0
        out["cpu_s"] = round(cpu, 3)
        # /proc counts CPU in 10 ms ticks: below a few ticks the quotient is noise
        out["cpu_us_per_line"] = cpu / max(1, out["lines"]) * 1e6 if cpu >= MIN_CPU_S else None
    return out


def run(work: Path, quick: bool, notes: list[str], smg_venv: Path) -> dict[str, Any]:
    node = procs.fake_node("m", "fast", num_parallel=4096, tokens_per_second=RATE,
                           tokens=TOKENS, max_queue=4096)
    started: list[procs.Proc] = [node]
    out: dict[str, Any] = {"counts": [1, 100] if quick else [1, 100, 1000], "runs": {},
                           "path": PATH}
    try:
        proxies: dict[str, procs.Proc] = {"appliance": procs.appliance([node], work, caps=4096)}
        started.append(proxies["appliance"])
        if (ngx := procs.nginx([node], work)) is not None:
            proxies["nginx"] = ngx
            started.append(ngx)
        smg, why = smgpeer.start([node], work, smg_venv)
        if smg is not None:
            proxies["smg"] = smg
            started.append(smg)
        elif why and not any(n.startswith("smg column") for n in notes):
            notes.append(f"smg column left out: {why}.")
        for proc in (node, *proxies.values()):  # a first stream each (connections, lazy
            run_streams(proc.url, 1)  # imports), not counted: the 1-stream row is one sample
        for n in out["counts"]:
            rounds = ROUNDS if n >= 1000 and not quick else 1
            per: dict[str, list[dict[str, Any]]] = {"direct": [], **{k: [] for k in proxies}}
            for _ in range(rounds):  # interleaved, so a slow spell of the VM hits every target
                per["direct"].append(run_streams(node.url, n))
                for name, proc in proxies.items():
                    per[name].append(run_streams(proc.url, n, watch=proc))
            runs = {name: merged(rs) for name, rs in per.items()}
            runs["appliance"]["rss_idle_mb"] = round(proxies["appliance"].rss_mb(), 1)
            out["runs"][n] = runs
    finally:
        for p in reversed(started):
            p.stop()
    return out


def merged(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """One target's rounds as one row: each timing the median over the rounds (a p99 of one
    round moves several-fold with the VM's slow spells), stalled and broken streams summed
    (none may be lost in any round), peak RSS the highest; a figure some round could not
    give (too little CPU to divide) is not given; every round kept beside."""
    if len(rounds) == 1:
        return rounds[0]
    row: dict[str, Any] = {"rounds": rounds}
    for key, value in rounds[0].items():
        values = [r.get(key) for r in rounds]
        if key == "broken_examples":
            row[key] = [e for v in values for e in v][:3]
        elif not isinstance(value, int | float) or isinstance(value, bool):
            row[key] = value
        elif None in values:
            row[key] = None
        elif key in ("stalled", "broken", "streams", "lines"):
            row[key] = sum(values)
        else:
            row[key] = max(values) if key == "rss_peak_mb" else statistics.median(values)
    return row


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _f(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def report(res: dict[str, Any]) -> str:
    lines = [f"### 2. Streaming relay (`{res['path']}` SSE, {TOKENS} tokens at {RATE} "
             "tokens/s per stream)", "",
             "| streams | target | TTFT p50 / p99 (ms) | added TTFT p99 (ms) | gap p50 / p99 / "
             "max (ms) | peak RSS (MB) | CPU per line (us) | stalled / broken |",
             "|---|---|---|---|---|---|---|---|"]
    for n, runs in res["runs"].items():
        d = runs["direct"]
        for name in ("direct", *PROXIES):
            r = runs.get(name)
            if r is None:
                continue
            add = None if name == "direct" else _sub(r["ttft_p99_ms"], d["ttft_p99_ms"])
            lines.append(
                f"| {n} | {name} | {_f(r['ttft_p50_ms'])} / {_f(r['ttft_p99_ms'])} | "
                f"{_f(add, 2) if name != 'direct' else '-'} | {_f(r['gap_p50_ms'])} / "
                f"{_f(r['gap_p99_ms'])} / {_f(r['gap_max_ms'])} | {r.get('rss_peak_mb', '-')} | "
                f"{_f(r.get('cpu_us_per_line'))} | {r['stalled']} / {r['broken']} |")
    lines += [line for n, runs in res["runs"].items() if (line := _rounds_line(n, runs))]
    lines.append("\nDirect is the client reading the node itself: its gaps are the floor the "
                 "client and node impose (all on the same 2 CPUs). A stalled stream has a gap "
                 "over 1 s; a broken one ended with an error or without `data: [DONE]`. CPU "
                 "per line is the proxy's CPU over the run (idle work such as health checks "
                 "included) over the lines relayed; n/a where the proxy used under "
                 f"{MIN_CPU_S * 1000:.0f} ms of CPU, too few 10 ms ticks to divide.")
    return "\n".join(lines)


def _rounds_line(n: Any, runs: dict[str, Any]) -> str:
    """What a row of several rounds is, and the appliance's added TTFT p99 in each."""
    mine, direct = runs["appliance"].get("rounds"), runs["direct"].get("rounds")
    if not mine or not direct:
        return ""
    added = ", ".join(_f(_sub(a["ttft_p99_ms"], d["ttft_p99_ms"]), 0)
                      for a, d in zip(mine, direct, strict=True))
    return (f"\n{n} streams: each figure the median of {len(mine)} rounds (direct and each "
            "proxy in turn, round after round); stalled and broken streams summed over them; "
            f"the appliance's added TTFT p99 round by round (ms): {added}.")


def goal_figures(res: dict[str, Any]) -> dict[str, Any]:
    """The figures of the streaming goals, at the largest stream count run."""
    n = max(res["runs"], key=int)
    d, a = res["runs"][n]["direct"], res["runs"][n]["appliance"]
    gap, direct_gap = a["gap_p99_ms"], d["gap_p99_ms"]
    return {"streams": int(n), "added_ttft_p99_ms": _sub(a["ttft_p99_ms"], d["ttft_p99_ms"]),
            "gap_p99_ms": gap, "direct_gap_p99_ms": direct_gap,
            "gap_vs_direct": gap / direct_gap if gap and direct_gap else None,
            "stalled": a["stalled"], "broken": a["broken"], "rss_mb": a["rss_peak_mb"],
            "cpu_us_per_line": a["cpu_us_per_line"]}
