"""The behaviour of a simulated Ollama node: models, loading, slots, timing, content.

It models an Ollama server's scheduler and capacity: a cold
model load takes the scheduler (bounded by ``max_queue``, 503 "server busy" past it), loaded
models have ``num_parallel`` slots and requests beyond them wait without limit, at most
``max_loaded`` models stay resident (an idle one is evicted for a new one), and keep-alive
expiry unloads idle models. Generated text is a pure function of the prompt, so a reply
through the appliance can be compared with one from the node directly.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import gevent
from gevent.event import Event
from gevent.lock import BoundedSemaphore, Semaphore

from app.fakenode import names
from app.fakenode.store import Blob, Library, Manifest, Model, is_embedding_name, library_manifest

WORDS = ("the", "sky", "is", "blue", "because", "of", "rayleigh", "scattering", "light",
         "from", "sun", "hits", "air", "molecules", "and", "shorter", "waves", "spread",
         "more", "so", "we", "see", "a", "bright", "dome", "above", "us", "every", "day")


@dataclass(frozen=True)
class Profile:
    """Timing of a simulated node; ``realistic`` uses figures typical of a single GPU."""

    load_s: float = 3.0  # cold load
    prefill_tps: float = 2000.0  # prompt tokens per second
    decode_tps: float = 60.0  # generated tokens per second per stream
    embed_s: float = 0.01  # per embed call
    num_parallel: int = 1  # OLLAMA_NUM_PARALLEL (default 1 since v0.10)
    max_loaded: int = 3  # OLLAMA_MAX_LOADED_MODELS on one GPU
    max_queue: int = 512  # OLLAMA_MAX_QUEUE
    keep_alive_s: float = 300.0  # OLLAMA_KEEP_ALIVE 5m
    tokens: int = 24  # reply length when num_predict is not given
    pull_bps: float = 100e6  # registry download (and push upload) bytes per second


PROFILES = {
    "realistic": Profile(),
    "fast": Profile(load_s=0.0, prefill_tps=0.0, decode_tps=0.0, embed_s=0.0, num_parallel=64,
                    max_loaded=64, tokens=8, pull_bps=0.0),
}


def make_profile(name: str = "realistic", **overrides: Any) -> Profile:
    base = PROFILES[name]
    return replace(base, **{k: v for k, v in overrides.items() if v is not None})


@dataclass
class Loaded:
    """A resident model (a runner)."""

    name: str  # display name, e.g. llama3.2:latest
    slots: BoundedSemaphore
    busy: int = 0
    keep_alive_s: float = 300.0
    expires_at: float = 0.0  # wall clock; while busy, shown as now + keep_alive
    ready: Event = field(default_factory=Event)  # set once the load has finished


@dataclass
class Stats:
    """What tests assert on: every counter the node can see from its side."""

    requests: int = 0
    active: int = 0  # inference requests being handled now
    max_active: int = 0
    peaks: list[tuple[float, int]] = field(default_factory=list)  # (time.time(), new max)
    streams_open: int = 0
    disconnects: int = 0  # streams cut by the client before the end
    loads: int = 0
    evictions: int = 0
    by_path: dict[str, int] = field(default_factory=dict)
    hosts: set[str] = field(default_factory=set)  # Host headers seen
    last_body: bytes = b""  # the last request body, byte for byte

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "active": self.active, "max_active": self.max_active,
                "streams_open": self.streams_open, "disconnects": self.disconnects,
                "loads": self.loads, "evictions": self.evictions,
                "by_path": dict(self.by_path), "hosts": sorted(self.hosts)}


class ServerBusy(Exception):
    """The scheduler queue is full (Ollama's 503)."""


def tokens_for(text: str, n: int) -> list[str]:
    """A deterministic reply of ``n`` tokens for ``text``."""
    seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")
    out = []
    for i in range(n):
        seed = (seed * 6364136223846793005 + 1442695040888963407) & (2**64 - 1)
        word = WORDS[(seed >> 33) % len(WORDS)]
        out.append(word if i == 0 else " " + word)
    return out


def embedding_for(text: str, dims: int = 16, normalise: bool = True) -> list[float]:
    digest = hashlib.sha256(text.encode()).digest()
    vec = [(b - 127.5) / 127.5 for b in digest[:dims]]
    if normalise:
        norm = math.sqrt(sum(v * v for v in vec)) or 1.0
        vec = [v / norm for v in vec]
    return vec


def prompt_tokens(text: str) -> int:
    return max(1, len(text) // 4)


class Simulator:
    """A node's models and scheduler. All waiting is gevent-cooperative."""

    def __init__(self, models: list[str], profile: Profile,
                 library: Iterable[str] | None = None) -> None:
        self.profile = profile
        self.library = Library(library)
        self.installed: dict[str, Model] = {}  # by names.key
        self.blobs: dict[str, Blob] = {}  # by "sha256:<hex>"
        self.loaded: dict[str, Loaded] = {}
        self._load_lock = Semaphore(1)  # the scheduler loads one model at a time
        self._scheduling = 0  # requests waiting for a load (bounded by max_queue)
        self.stats = Stats()
        for i, name in enumerate(models):  # installed before start, newest first
            manifest = library_manifest(name)
            self.install(name, manifest, is_embedding_name(name), modified=time.time() - i * 3600)
            self.blobs.update({b.digest: Blob(b.size) for b in manifest.blobs})

    def has(self, model: str) -> bool:
        return names.key(model) in self.installed

    def get(self, model: str) -> Model | None:
        return self.installed.get(names.key(model))

    def is_embedding(self, model: str) -> bool:
        found = self.get(model)
        return found.embedding if found else is_embedding_name(model)

    # --- the model store ------------------------------------------------------------------------

    def install(self, name: str, manifest: Manifest, embedding: bool, system: str = "",
                parent: str = "", modified: float | None = None) -> list[str]:
        """Write a model's manifest; returns the digests its old manifest alone used."""
        key = names.key(name)
        old = self.installed.get(key)
        self.installed[key] = Model(names.short(name), manifest,
                                    time.time() if modified is None else modified,
                                    embedding, system, parent)
        return self._prune(old.manifest) if old else []

    def remove(self, name: str) -> None:
        """Delete a model and the blobs no other model uses (Ollama prunes on delete)."""
        old = self.installed.pop(names.key(name), None)
        self.unload(name)
        if old:
            self._prune(old.manifest)

    def _prune(self, manifest: Manifest) -> list[str]:
        used = {b.digest for m in self.installed.values() for b in m.manifest.blobs}
        gone = [b.digest for b in manifest.blobs if b.digest not in used and b.digest in
                self.blobs]
        for digest in gone:
            del self.blobs[digest]
        return gone

    # --- scheduling ---------------------------------------------------------------------------

    def expire(self) -> None:
        now = time.time()
        for key, runner in list(self.loaded.items()):
            if runner.busy == 0 and runner.expires_at <= now:
                del self.loaded[key]

    def ensure_loaded(self, model: str, keep_alive_s: float | None) -> tuple[Loaded, float]:
        """Load if needed; returns the runner and the seconds spent loading."""
        key = names.key(model)
        self.expire()
        runner = self.loaded.get(key)
        if runner is not None:
            if not runner.ready.is_set():  # being loaded by another request: wait for it
                t0 = time.monotonic()
                runner.ready.wait()
                return runner, time.monotonic() - t0
            self._keep(runner, keep_alive_s)
            return runner, 0.001
        if self._scheduling >= self.profile.max_queue:
            raise ServerBusy()
        self._scheduling += 1
        t0 = time.monotonic()
        try:
            with self._load_lock:
                runner = self.loaded.get(key)
                if runner is None:
                    self._make_room()
                    # listed in /api/ps while it loads, as Ollama lists a loading model
                    runner = Loaded(self.installed[key].name,
                                    BoundedSemaphore(self.profile.num_parallel),
                                    keep_alive_s=self.profile.keep_alive_s)
                    runner.expires_at = time.time() + runner.keep_alive_s
                    runner.busy += 1  # not evictable while loading
                    self.loaded[key] = runner
                    try:
                        if self.profile.load_s:
                            gevent.sleep(self.profile.load_s)
                    finally:
                        runner.busy -= 1
                        runner.ready.set()
                    self.stats.loads += 1
        finally:
            self._scheduling -= 1
        self._keep(runner, keep_alive_s)
        return runner, time.monotonic() - t0

    def _make_room(self) -> None:
        """Evict idle runners until one more fits; wait while all are busy."""
        while len(self.loaded) >= self.profile.max_loaded:
            idle = [(r.expires_at, k) for k, r in self.loaded.items() if r.busy == 0]
            if idle:
                del self.loaded[min(idle)[1]]
                self.stats.evictions += 1
            else:
                gevent.sleep(0.01)

    def unload(self, model: str) -> None:
        self.loaded.pop(names.key(model), None)

    def begin(self, runner: Loaded) -> None:
        runner.slots.acquire()
        runner.busy += 1

    def end(self, runner: Loaded) -> None:
        runner.busy -= 1
        runner.slots.release()
        if runner.keep_alive_s == 0 and runner.busy == 0:
            self.loaded = {k: r for k, r in self.loaded.items() if r is not runner}
        else:
            self._arm(runner)

    def _keep(self, runner: Loaded, keep_alive_s: float | None) -> None:
        """The last request's keep_alive wins; an idle runner's timer restarts with it
        (a preload with keep_alive -1 is pinned at once, as /api/ps then shows)."""
        if keep_alive_s is not None:
            runner.keep_alive_s = keep_alive_s
            if runner.busy == 0:
                self._arm(runner)

    @staticmethod
    def _arm(runner: Loaded) -> None:
        forever = 292 * 365 * 86400  # Go's maximum duration, as Ollama shows a pinned model
        runner.expires_at = time.time() + (runner.keep_alive_s if runner.keep_alive_s >= 0
                                           else forever)

    # --- generation ---------------------------------------------------------------------------

    def prefill(self, text: str) -> tuple[int, float]:
        n = prompt_tokens(text)
        secs = n / self.profile.prefill_tps if self.profile.prefill_tps else 0.0
        if secs:
            gevent.sleep(secs)
        return n, secs

    def decode(self, text: str, n: int, rate: float | None = None) -> Iterator[str]:
        rate = self.profile.decode_tps if rate is None else rate
        gap = 1.0 / rate if rate else 0.0
        for tok in tokens_for(text, n):
            if gap:
                gevent.sleep(gap)
            yield tok
