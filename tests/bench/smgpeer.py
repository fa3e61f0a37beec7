"""The SGLang Model Gateway (``smg``, Rust) as a peer column beside nginx.

nginx says what a general-purpose C proxy costs; smg says what an LLM gateway written for the
job costs (it parses the OpenAI request to route it, as the appliance does), so the issue's
goals are stated against it. It is a PyPI package (``sglang-router``) with heavy dependencies
of its own, so it gets its own venv under bench-results/ and never touches the appliance's;
the venv is reused when present. Where it cannot be installed or started, the harness leaves
the column out and says why, rather than failing the whole run.

smg speaks the OpenAI API only (``--backend openai``), so it is compared on
``/v1/chat/completions``, which the simulated node serves. It is started as the issue measured
it, plus loopback host and ports: ``smg launch --backend openai --disable-health-check
--worker-urls URL``, default routing policy, warnings only in its log.
"""

from __future__ import annotations

from pathlib import Path

import procs
import toolvenv

PACKAGE = "sglang-router"
#: the version installed into a new venv (one that exists is reused as it is)
PIN = "0.3.2"


def binary(venv: Path) -> Path:
    return venv / "bin" / "smg"


def installed_version(venv: Path) -> str | None:
    return toolvenv.installed_version(venv, PACKAGE)


def ensure(venv: Path) -> tuple[Path | None, str]:
    """The smg executable, installing it into ``venv`` first if needed; (None, why) if not."""
    return toolvenv.ensure(venv, PACKAGE, PIN, "smg")


def start(nodes: list[procs.Proc], workdir: Path, venv: Path) -> tuple[procs.Proc | None, str]:
    """smg in front of ``nodes``, ready to serve; (None, why) when it cannot be had."""
    exe, why = ensure(venv)
    if exe is None:
        return None, why
    port, metrics_port = procs.free_port(), procs.free_port()
    args = [str(exe), "launch", "--backend", "openai", "--disable-health-check",
            "--worker-urls", *[n.url for n in nodes], "--host", "127.0.0.1", "--port", str(port),
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port),
            "--log-level", "warn"]
    try:
        return procs.Proc(args, f"http://127.0.0.1:{port}", log=workdir / f"smg-{port}.log",
                          ready="/liveness", ready_timeout=60), ""
    except RuntimeError as exc:
        return None, f"smg did not start: {exc}"
