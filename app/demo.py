"""``make demo``: the appliance in front of three simulated nodes on loopback, until Ctrl-C."""

from __future__ import annotations

import signal

import gevent

from app.fakenode import FakeNodeServer, make_profile
from app.server import OllamaLoadBalancerApplication
from pipeline.config import parse_config

NODES = (("gpu-a", ["llama3.2", "all-minilm"]), ("gpu-b", ["llama3.2", "mistral"]),
         ("gpu-c", ["mistral", "qwen2.5:0.5b"]))


def run_demo(port: int = 8080, profile: str = "realistic") -> int:
    fakes = []
    for _, models in NODES:
        prof = make_profile(profile, num_parallel=2, load_s=1.5 if profile == "realistic"
                            else None, decode_tps=25 if profile == "realistic" else None)
        # no fault_api: the demo's nodes have no /_fake/* control routes, like real Ollama
        fakes.append(FakeNodeServer(models, prof, fault_api=False).start())
    config = parse_config({
        "server": {"host": "127.0.0.1", "port": port, "drainSeconds": 2},
        "nodes": [{"id": nid, "url": f.url, "maxConcurrentRequests": 2}
                  for (nid, _), f in zip(NODES, fakes, strict=True)],
        "strategy": {"type": "model-aware"},
        "healthCheck": {"intervalMs": 2000, "modelRefreshMs": 2000},
    })
    app = OllamaLoadBalancerApplication(config, watch=False).start()
    print(f"\nollama-lb demo: appliance on {app.url}")
    for (nid, models), f in zip(NODES, fakes, strict=True):
        print(f"  simulated node {nid} on {f.url} with {', '.join(models)}")
    print("\nTry:")
    print(f"  curl {app.url}/api/chat -d '{{\"model\": \"llama3.2\", \"messages\": "
          f"[{{\"role\": \"user\", \"content\": \"Why is the sky blue?\"}}]}}'")
    print(f"  curl {app.url}/api/tags     curl {app.url}/health     curl {app.url}/metrics")
    print(f"  OLLAMA_HOST={app.url} python -c \"import ollama; print(ollama.generate("
          f"model='mistral', prompt='hi').response)\"")
    print("\nCtrl-C to stop.", flush=True)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGINT, stop.set)
    gevent.signal_handler(signal.SIGTERM, stop.set)
    stop.wait()
    app.shutdown(drain_s=2)
    for f in fakes:
        f.stop()
    return 0
