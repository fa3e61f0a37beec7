"""The bench report's own logic: goal verdicts, wrk parsing, stream endings, process-tree CPU.

These run in ``make test`` (they time nothing); ``make bench`` runs only the benchmarks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import goals
import procs
import pytest
import wrkrun
from streamclient import finished

WRK_OUTPUT = """Running 2s test @ http://127.0.0.1:1/v1/chat/completions
  1 threads and 10 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  300.00us   5.00ms   90.00%
  Latency Distribution
     50%  980.00us
     75%    1.20ms
     90%    1.50ms
     99%    2.50ms
  9000 requests in 2.00s, 3.00MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 7
Requests/sec:   4500.00
Transfer/sec:      1.50MB
"""


def test_wrk_report_is_parsed_with_its_errors():
    r = wrkrun.parse(WRK_OUTPUT)
    assert r == {"rps": 4500.0, "p50_ms": pytest.approx(0.98), "p99_ms": 2.5,
                 "requests": 9000, "non2xx": 7, "socket_errors": 3}


def test_wrk_output_without_figures_is_an_error_not_zero_throughput():
    with pytest.raises(RuntimeError, match="no figures"):
        wrkrun.parse("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_stream_endings_of_both_formats():
    assert finished(b"data: [DONE]")
    assert finished(b'{"model":"m","done":true}')
    assert not finished(b'data: {"choices": []}')
    assert not finished(b'{"done": false}')


def overhead_result(appliance_cpu: float, smg: bool) -> dict:
    def target(rps: float, p50: float, cpu: float) -> dict:
        return {"rps": [rps], "p50_ms": [p50], "p99_ms": [p50 * 2], "cpu_us": [cpu],
                "non2xx": [0], "socket_errors": [0]}

    rows = []
    for conns in (1, 10):
        runs = {"direct": target(5000, 1.0, 50), "appliance": target(2000, 1.5, appliance_cpu)}
        if smg:
            runs["smg"] = target(3000, 1.1, 200)
        rows.append({"endpoint": "chat", "path": "/v1/chat/completions", "conns": conns,
                     "runs": runs})
    return {"rows": rows, "hello": {"rps": [4000], "cpu_us": [300]}}


def test_cpu_goals_flip_at_their_thresholds():
    met = {g: v for g, v, _ in goals.non_streaming(overhead_result(750, smg=True))}
    assert met["CPU per proxied request <= 2.5x a bare Flask-on-gevent hello world "
               "(10 clients)"] == "**met**"  # 750 / 300 = 2.5
    assert met["CPU per proxied request <= 4x smg's (10 clients)"] == "**met**"  # 3.75x
    assert met["throughput >= 0.5x smg's (10 clients)"] == "**met**"  # 0.67x
    assert met["added p50 < 1 ms at 1 client"] == "**met**"  # +0.5 ms
    worse = {g: v for g, v, _ in goals.non_streaming(overhead_result(900, smg=True))}
    assert worse["CPU per proxied request <= 2.5x a bare Flask-on-gevent hello world "
                 "(10 clients)"] == "not met"
    assert worse["CPU per proxied request <= 4x smg's (10 clients)"] == "not met"  # 4.5x


def test_goals_against_smg_are_not_measured_without_smg():
    rows = goals.non_streaming(overhead_result(750, smg=False))
    verdicts = {g: (v, f) for g, v, f in rows}
    assert verdicts["throughput >= 0.5x smg's (10 clients)"] == (
        "not measured", "no smg column in this run")
    assert goals.non_streaming(None)[0][1] == "not measured"


def test_process_tree_cpu_counts_a_busy_child():
    parent = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys; subprocess.run([sys.executable, '-c', "
                               "'while True: pass'])"])
    try:
        deadline = time.monotonic() + 20
        while len(procs.tree_pids(parent.pid)) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        pids = procs.tree_pids(parent.pid)
        assert len(pids) == 2
        while (procs.cpu_seconds_of(pids[1]) < 0.1 and time.monotonic() < deadline):
            time.sleep(0.01)
        total = sum(procs.cpu_seconds_of(p) for p in procs.tree_pids(parent.pid))
        assert total >= procs.cpu_seconds_of(pids[1]) >= 0.1  # the child's work is counted
    finally:
        for pid in reversed(procs.tree_pids(parent.pid)):  # the child first, then its parent
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        parent.wait(timeout=10)
