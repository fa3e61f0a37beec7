"""The simulated Ollama node, for tests, demos and benchmarks (``ollama-lb fake-node``)."""

from app.fakenode.server import FakeNodeServer
from app.fakenode.sim import PROFILES, Profile, make_profile
from app.fakenode.wsgi import FakeNode

__all__ = ["PROFILES", "FakeNode", "FakeNodeServer", "Profile", "make_profile"]
