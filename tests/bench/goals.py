"""The issue's goals, as ratios of figures measured side by side in one run: met or not.

Nothing here is a pass/fail test (timings on a shared machine are not verdicts a CI could
trust); it is the table a reader checks first, each verdict next to the figure it rests on.
A goal whose figures this run did not produce (a scenario skipped, smg not installed, a
``--quick`` run with fewer streams) says so instead of passing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import apikeys
import overhead
import streams

Row = tuple[str, str, str]  # goal, verdict, figure


def _row(goal: str, value: float | None, ok: Callable[[float], bool], figure: str,
         missing: str) -> Row:
    if value is None:
        return goal, "not measured", missing
    return goal, "**met**" if ok(value) else "not met", figure


def non_streaming(res: dict[str, Any] | None) -> list[Row]:
    if res is None:
        return [("non-streaming goals", "not measured", "scenario 1 did not run")]
    g = overhead.goal_figures(res)
    no_smg = "no smg column in this run"
    cpu, hello, smg = g["cpu_us"] or 0, g["hello_cpu_us"], g["smg_cpu_us"] or 0
    return [
        _row("CPU per proxied request <= 2.5x a bare Flask-on-gevent hello world (10 clients)",
             g["cpu_vs_hello"], lambda v: v <= 2.5,
             f"{g['cpu_vs_hello'] or 0:.2f}x ({cpu:,.0f} us vs {hello:,.0f} us)", "-"),
        _row("CPU per proxied request <= 4x smg's (10 clients)", g["cpu_vs_smg"],
             lambda v: v <= 4, f"{g['cpu_vs_smg'] or 0:.2f}x ({cpu:,.0f} us vs {smg:,.0f} us)",
             no_smg),
        _row("throughput >= 0.5x smg's (10 clients)", g["rps_vs_smg"], lambda v: v >= 0.5,
             f"{g['rps_vs_smg'] or 0:.2f}x ({g['rps'] or 0:,.0f} vs {g['smg_rps'] or 0:,.0f} "
             "req/s)", no_smg),
        _row("added p50 < 1 ms at 1 client", g["added_p50_1_ms"], lambda v: v < 1,
             f"{g['added_p50_1_ms'] or 0:+.2f} ms", "-"),
    ]


def streaming(res: dict[str, Any] | None) -> list[Row]:
    if res is None:
        return [("streaming goals", "not measured", "scenario 2 did not run")]
    g = streams.goal_figures(res)
    n = g["streams"]
    at = (f" (at {n} streams, not the goal's 1,000: a --quick run)" if n < 1000
          else f" ({n:,} streams)")
    return [
        _row(f"added TTFT p99 < 50 ms{at}", g["added_ttft_p99_ms"],
             lambda v: v < 50, f"{g['added_ttft_p99_ms'] or 0:+,.1f} ms", "no figure"),
        _row(f"gap p99 within 1.5x of direct{at}", g["gap_vs_direct"], lambda v: v <= 1.5,
             f"{g['gap_vs_direct'] or 0:.2f}x ({g['gap_p99_ms'] or 0:.1f} vs "
             f"{g['direct_gap_p99_ms'] or 0:.1f} ms)", "no figure"),
        _row(f"nothing stalled or broken{at}", g["stalled"] + g["broken"], lambda v: v == 0,
             f"{g['stalled']} stalled, {g['broken']} broken", "-"),
        _row(f"RSS < 150 MB{at}", g["rss_mb"], lambda v: v < 150, f"{g['rss_mb']:.0f} MB",
             "-"),
        _row(f"CPU per relayed line <= 15 us{at}", g["cpu_us_per_line"], lambda v: v <= 15,
             f"{g['cpu_us_per_line'] or 0:.1f} us", "too little CPU to read"),
    ]


def ring(res: dict[str, Any] | None) -> list[Row]:
    if res is None:
        return [("ring goals", "not measured", "no bench-results/ring.json (pytest-benchmark)")]
    lat = res.get("test_ring_latency_at_10k_per_second")
    yielding = res.get("test_ring_throughput[yielding]")
    p50 = lat["p50_us"] - lat["loop_p50_us"] if lat else None
    p99 = lat["p99_us"] - lat["loop_p99_us"] if lat else None
    rps = 20000 / yielding["median_s"] if yielding else None
    return [
        _row("ring adds < 50 us p50 over a plain loop at 10,000 req/s (paced)", p50,
             lambda v: v < 50, f"{p50 or 0:+,.0f} us", "no latency benchmark"),
        _row("ring adds < 150 us p99 over a plain loop at 10,000 req/s (paced)", p99,
             lambda v: v < 150, f"{p99 or 0:+,.0f} us", "no latency benchmark"),
        _row("ring > 50,000 req/s with no-op dispatch (default `yielding`)", rps,
             lambda v: v > 50000, f"{rps or 0:,.0f} req/s", "no throughput benchmark"),
    ]


def api_keys(res: dict[str, Any] | None) -> list[Row]:
    goal = (f"API keys add < {apikeys.GOAL_PCT:.0f} % CPU per request ({apikeys.CONNS} "
            "clients, worse of a key and a key with a models allow-list)")
    if res is None:
        return [(goal, "not measured", "scenario 6 did not run")]
    g = apikeys.goal_figures(res)
    if g["errors"]:  # a fast refusal must never pass for a cheap request
        return [(goal, "not measured", f"{g['errors']} non-2xx or socket errors in the runs")]
    cpu, ir = g["cpu_us"], g["ir_pct"]
    in_time = (f"{g['key_pct']:+.1f} % with a key, {g['models_pct']:+.1f} % with a models "
               f"allow-list ({cpu['key']:,.0f} / {cpu['key + models']:,.0f} us vs "
               f"{cpu['no keys']:,.0f} us)")
    figure = in_time if ir is None else (
        f"instructions: {ir['key']:+.1f} % with a key, {ir['key + models']:+.1f} % with a "
        f"models allow-list; CPU time: {in_time}")
    return [_row(goal, g["added_pct"], lambda v: v < apikeys.GOAL_PCT, figure, "-")]


def render(report: dict[str, Any]) -> str:
    rows = (non_streaming(report.get("overhead")) + streaming(report.get("streams"))
            + ring(report.get("ring")) + api_keys(report.get("apikeys")))
    lines = ["### Against the goals (issue 14, and the API keys' CPU goal; ratios from this "
             "one run)", "",
             "| goal | verdict | figure |", "|---|---|---|"]
    lines += [f"| {goal} | {verdict} | {figure} |" for goal, verdict, figure in rows]
    return "\n".join(lines)
