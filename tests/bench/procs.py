"""Processes the benchmark harness starts and stops: nodes, the appliance, nginx, hello world.

Every process listens on loopback only, is started by the harness and killed by it.
"""

from __future__ import annotations

import json
import os
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


def wait_http(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            requests.get(url, timeout=1)
            return
        except requests.RequestException:
            time.sleep(0.05)
    raise RuntimeError(f"{url} did not come up")


class Proc:
    def __init__(self, args: list[str], url: str, log: Path | None = None,
                 ready: str = "/") -> None:
        self.log_path = log
        out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
        self.p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT if log else
                                  subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        self.url = url
        wait_http(url + ready)

    @property
    def pid(self) -> int:
        return self.p.pid

    def cpu_seconds(self) -> float:
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

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


def hello_world() -> Proc:
    port = free_port()
    return Proc([PY, str(HERE / "hello.py"), str(port)], f"http://127.0.0.1:{port}")


def nginx(nodes: list[Proc], workdir: Path) -> Proc | None:
    """nginx as the reference proxy (least_conn, streaming unbuffered); None if absent."""
    binary = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists()
                                       else None)
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
