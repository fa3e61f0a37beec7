"""ollama-lb's HTTP shell: server, Flask app, admin API, reload, logging, simulated node.

Import ``app.server`` (or use this package's lazy attribute) only after
``gevent.monkey.patch_all()``; the ``ollama-lb`` command and ``python -m app`` do that first.
"""

from typing import Any

__all__ = ["OllamaLoadBalancerApplication"]


def __getattr__(name: str) -> Any:
    if name == "OllamaLoadBalancerApplication":
        from app.server import OllamaLoadBalancerApplication

        return OllamaLoadBalancerApplication
    raise AttributeError(name)
