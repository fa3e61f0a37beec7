"""Processes the benchmark harness starts and stops: nodes, the appliance, nginx, hello world.

Every process listens on loopback only, is started by the harness and killed by it. CPU and
RSS are read from /proc for a process and all its descendants, because nginx does its work in
worker processes (its master only supervises) and every proxy is charged what it really costs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests
import yaml

PY = sys.executable
HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 20, proc: subprocess.Popen[bytes] | None = None) -> None:
    """Until ``url`` answers anything; fails at once if ``proc`` exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"exited with status {proc.returncode} before {url} answered")
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def tree_pids(pid: int) -> list[int]:
    """``pid`` and its live descendants (read from each thread's ``children`` list)."""
    found, todo = [], [pid]
    while todo and len(found) < 4096:
        current = todo.pop()
        found.append(current)
        try:
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # exited meanwhile
            continue
    return found


def cpu_seconds_of(pid: int) -> float:
    """User + system CPU of one process, all its threads included (0 once it has gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mb_of(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class Proc:
    """A started server: its URL, and its CPU and memory summed over its process tree."""

    def __init__(self, args: list[str], url: str, log: Path | None = None,
                 ready: str = "/", ready_timeout: float = 20) -> None:
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log else
                                  subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.url = url
        try:
            wait_http(url + ready, ready_timeout, self.p)
        except RuntimeError as exc:
            self.stop()
            raise RuntimeError(f"{Path(args[0]).name}: {exc}{self._log_tail()}") from None

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-3:]
        return (" (log: " + " | ".join(tail)[:300] + ")") if tail else ""

    @property
    def pid(self) -> int:
        return self.p.pid

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in tree_pids(self.pid))

    def rss_mb(self) -> float:
        return sum(rss_mb_of(pid) for pid in tree_pids(self.pid))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.terminate()
            try:
                self.p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()


def fake_node(models: str, profile: str = "fast", **opts: Any) -> Proc:
    port = free_port()
    args = [PY, "-m", "app", "fake-node", "--port", str(port), "--models", models,
            "--profile", profile]
    for key, value in opts.items():
        if value is True:  # a bare flag, e.g. fault_api=True -> --fault-api
            args.append(f"--{key.replace('_', '-')}")
        elif value is not None:
            args += [f"--{key.replace('_', '-')}", str(value)]
    return Proc(args, f"http://127.0.0.1:{port}")


def appliance(nodes: list[Proc], workdir: Path, caps: int = 64, **sections: Any) -> Proc:
    port = free_port()
    cfg: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": port, "backlog": 4096, "drainSeconds": 1},
        "nodes": [{"id": f"n{i}", "url": n.url, "maxConcurrentRequests": caps}
                  for i, n in enumerate(nodes)],
        "disruptor": {"maxGlobalInFlight": 8192, "queueSize": 4096},
        "logging": {"level": "WARNING"},
        "healthCheck": {"intervalMs": 2000, "modelRefreshMs": 2000},
    }
    for key, value in sections.items():
        cfg[key] = {**cfg.get(key, {}), **value} if isinstance(value, dict) else value
    path = workdir / f"lb-{port}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return Proc([PY, "-m", "app", str(path), "--no-watch"], f"http://127.0.0.1:{port}",
                log=workdir / f"lb-{port}.log", ready="/health/live")


def wait_log(proc: Proc, text: str, timeout: float = 30) -> None:
    """Until ``text`` appears in ``proc``'s log (a server that logs its readiness, e.g. every
    worker of ``server.workers`` ready); fails at once if the process exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.p.poll() is not None:
            raise RuntimeError(f"exited with status {proc.p.returncode}{proc._log_tail()}")
        if proc.log_path and text in proc.log_path.read_text(errors="replace"):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{text!r} not logged within {timeout:.0f} s{proc._log_tail()}")


class Redis:
    """``redis-server`` on a Unix socket in ``workdir`` (as deploy/install.sh runs it for
    ``server.workers``), no persistence; its CPU and its command count, read per run."""

    def __init__(self, binary: str, workdir: Path, timeout: float = 10) -> None:
        self.sock = workdir / f"redis-{free_port()}.sock"
        self.url = f"unix://{self.sock}"
        self.p = subprocess.Popen([binary, "--port", "0", "--unixsocket", str(self.sock),
                                   "--unixsocketperm", "700", "--save", "", "--appendonly", "no",
                                   "--dir", str(workdir)], stdin=subprocess.DEVNULL,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.command("PING").startswith(b"+PONG"):
                    return
            except OSError:
                pass
            if self.p.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not answer on {self.sock}")
            time.sleep(0.05)

    def command(self, line: str) -> bytes:
        """One inline command, its whole reply (a bulk reply read to its announced length)."""
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(2)
            s.connect(str(self.sock))
            s.sendall(line.encode() + b"\r\n")
            data = s.recv(65536)
            if data.startswith(b"$"):
                head, _, rest = data.partition(b"\r\n")
                while len(rest) < int(head[1:]) and (chunk := s.recv(65536)):
                    rest += chunk
                return rest
            return data

    def command_calls(self) -> dict[str, int]:
        """Calls so far per command (``INFO commandstats``; a script's own calls included)."""
        text = self.command("INFO commandstats").decode()
        return {m[0]: int(m[1]) for m in re.findall(r"^cmdstat_(\S+?):calls=(\d+)", text, re.M)}

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds_of(pid) for pid in tree_pids(self.p.pid))

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait(10)


def redis_binary() -> str | None:
    return shutil.which("redis-server")  # Debian package redis-server


def hello_world() -> Proc:
    port = free_port()
    return Proc([PY, str(HERE / "hello.py"), str(port)], f"http://127.0.0.1:{port}")


def nginx_binary() -> str | None:
    """nginx on PATH or in /usr/sbin (Debian puts it there, outside a normal user's PATH)."""
    return shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                     else None)


def nginx(nodes: list[Proc], workdir: Path) -> Proc | None:
    """nginx as the reference proxy (least_conn, streaming unbuffered); None if absent."""
    binary = nginx_binary()
    if binary is None:
        return None
    port = free_port()
    prefix = Path(tempfile.mkdtemp(dir=workdir, prefix="nginx-"))
    (prefix / "logs").mkdir()
    upstreams = "\n".join(f"    server {n.url.removeprefix('http://')};" for n in nodes)
    (prefix / "nginx.conf").write_text(f"""
worker_processes 1;
error_log {prefix}/logs/error.log warn;
pid {prefix}/nginx.pid;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body; proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fcgi; uwsgi_temp_path {prefix}/uwsgi; scgi_temp_path {prefix}/scgi;
  upstream ollama {{
    least_conn;
{upstreams}
    keepalive 256;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      proxy_pass http://ollama;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
""")
    return Proc([binary, "-p", str(prefix), "-c", str(prefix / "nginx.conf"), "-g",
                 "daemon off;"], f"http://127.0.0.1:{port}")


def scrape(url: str) -> dict[str, Any]:
    return json.loads(requests.get(url + "/health", timeout=5).text)
