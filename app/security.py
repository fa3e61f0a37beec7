"""The appliance's security state: keys, proxy trust, accounts, usage series and file.

One per pipeline factory, however many Flask apps are made on it (its Prometheus series can be
registered once only). It follows the running config: every request compares the config
object with the one it was built from (an identity test), so a reload (file watch, SIGHUP,
``POST /admin/reload``) applies to the very next request, and a key that was removed, or whose
hash changed, stops working at once; its live streams are cut (``app/meter.py``).
"""

from __future__ import annotations

import logging
import time
import weakref
from typing import Any

from app.clientaddr import Client, ProxyTrust, is_loopback
from app.keymetrics import KeyMetrics
from app.keys import ApiKey, KeyRing
from app.limits import Grant, LimitSettings
from app.meter import Metered
from app.usage import UsageBook, utc_day
from app.usagestore import UsageStore, open_store
from pipeline.config import Config
from pipeline.factory import PipelineFactory

log = logging.getLogger("ollama_lb.security")
CLIENT = "ollama_lb.client"
PEER = "ollama_lb.peer"  # the TCP peer, when REMOTE_ADDR was rewritten to the forwarded client

_BY_FACTORY: weakref.WeakKeyDictionary[PipelineFactory, Security] = (
    weakref.WeakKeyDictionary())


class Security:
    def __init__(self, factory: PipelineFactory) -> None:
        # weakly: this object is the factory's value in _BY_FACTORY, which must not keep it
        self._factory = weakref.ref(factory)
        self.book = UsageBook()
        self.metrics = KeyMetrics(factory.metrics_registry, self.in_flight)
        self.store: UsageStore | None = open_store(factory.config.security.usageFile,
                                                   self.book)
        self.keyring = KeyRing(())
        self.trust = ProxyTrust(())
        self._config: Config | None = None
        self.refresh()
        self.shared_limits: Any = None  # sharedState.redisUrl: limits counted in Redis
        if factory.shared is not None:  # without it, admission below is exactly as before
            from app.sharedlimits import SharedLimits  # redis-py only when configured

            self.shared_limits = SharedLimits(factory, self.book, self.settle)
            self.admit_key = self.shared_limits.admit_key  # type: ignore[method-assign]
            self.admit_client = self.shared_limits.admit_client  # type: ignore[method-assign]
            self.settle = self.shared_limits.settle  # type: ignore[method-assign]

    @property
    def factory(self) -> PipelineFactory:
        factory = self._factory()
        assert factory is not None, "the pipeline factory is gone"
        return factory

    @classmethod
    def of(cls, factory: PipelineFactory) -> Security:
        sec = _BY_FACTORY.get(factory)
        if sec is None:
            sec = _BY_FACTORY[factory] = cls(factory)
        return sec

    # --- following the config -----------------------------------------------------------------

    def refresh(self) -> Config:
        """The running config, with keys and trust rebuilt if it changed since last time."""
        cfg = self.factory.config
        if cfg is not self._config:
            self._apply(cfg)
        return cfg

    def _apply(self, cfg: Config) -> None:
        old = self._config
        if old is None or cfg.security.apiKeys != old.security.apiKeys:
            self._new_keys(KeyRing(cfg.security.apiKeys), first=old is None)
        if old is None or cfg.server.trustedProxies != old.server.trustedProxies:
            self.trust = ProxyTrust(cfg.server.trustedProxies)
        self._config = cfg

    def _new_keys(self, ring: KeyRing, first: bool) -> None:
        old = self.keyring
        gone = [k.name for h, k in old.by_hash.items() if h not in ring.by_hash]
        cut = 0
        for name in gone:
            if name in self.book.keys:
                cut += self.book.keys[name].allowance.revoke()
        self.keyring = ring
        self.metrics.declare(list(ring.by_name))
        if not first:
            log.warning("API keys changed", extra={
                "event": "api_keys", "keys": sorted(ring.by_name),
                "added": sorted(k.name for h, k in ring.by_hash.items()
                                if h not in old.by_hash),
                "revoked": sorted(gone), "streams_cut": cut})

    # --- who is asking ------------------------------------------------------------------------

    def client(self, environ: dict[str, Any]) -> Client:
        """The client of this request (cached in the environ); behind a trusted proxy,
        REMOTE_ADDR becomes the forwarded client, so logs and limits see who it is."""
        client = environ.get(CLIENT)
        if client is None:
            client = environ[CLIENT] = self.trust.resolve(environ)
            if client.address != client.peer:
                environ[PEER] = client.peer
                environ["REMOTE_ADDR"] = client.address
        return client

    # --- admission and the end of a request ---------------------------------------------------

    def admit_key(self, key: ApiKey, counts_tokens: bool) -> Grant:
        """Raises Denied over a limit of the key; one clock reading serves the bucket and the
        grant."""
        name, limits = key.name, key.config
        account = self.book.keys.get(name) or self.book.key(name)
        now = time.monotonic()
        # today's tokens are summed only where a quota will compare them
        used = account.used_today(utc_day()) if counts_tokens and limits.tokensPerDay else 0
        account.allowance.admit(lambda: f"key '{name}'", limits, used, now, tokens=counts_tokens)
        return Grant(account.allowance, account, name, counts_tokens, now)

    def admit_client(self, address: str, limits: LimitSettings, counts_tokens: bool) -> Grant:
        now = time.monotonic()
        account = self.book.client(address, now)
        used = account.used_today(utc_day()) if counts_tokens and limits.tokensPerDay else 0
        account.allowance.admit(lambda: f"client {address}", limits, used, now,
                                tokens=counts_tokens)
        return Grant(account.allowance, account, None, counts_tokens, now)

    def finish(self, reply: Metered) -> None:
        """The reply is closed: give the place back, then charge what it used."""
        grant = reply.grant
        if grant.released:
            return
        counter = reply.counter
        tokens_in, tokens_out = counter.counts() if counter is not None else (0, 0)
        self.settle(grant, reply.status >= 400 or reply.cut or reply.failed, tokens_in,
                    tokens_out, reply.first_at)

    def settle(self, grant: Grant, error: bool, tokens_in: int, tokens_out: int,
               first_at: float | None) -> bool:
        """An admitted request's end, once: its place given back, its use charged; False if
        it had ended before. A whole reply is settled here at once (``app/fastlane.py``),
        a stream or any other reply through ``finish`` when it is closed."""
        if not grant.release():
            return False
        grant.account.charge(1, int(error), tokens_in, tokens_out)
        if grant.key is not None:
            ttft = (first_at - grant.started
                    if first_at is not None and grant.counts_tokens and not error else None)
            self.metrics.finished(grant.key, error, tokens_in, tokens_out, ttft)
            if self.store is not None:
                self.store.dirty()
        return True

    def rejected(self, key: str, reason: str) -> None:
        self.metrics.rejections(key, reason).inc()

    # --- reports ------------------------------------------------------------------------------

    def in_flight(self) -> dict[str, int]:
        return {name: self.book.key(name).allowance.in_flight for name in self.keyring.by_name}

    def usage(self) -> dict[str, Any]:
        self.refresh()
        doc = self.book.report(sorted(self.keyring.by_name))
        doc["persisted"] = self.store.path if self.store is not None else None
        return doc

    @classmethod
    def close_for(cls, factory: PipelineFactory) -> None:
        """Flush the usage of a factory's security, if it has one (shutdown)."""
        sec = _BY_FACTORY.get(factory)
        if sec is not None:
            sec.close()

    def close(self) -> None:
        """Write pending usage (the process is stopping)."""
        if self.shared_limits is not None:
            self.shared_limits.stop()
            self.shared_limits = None
        if self.store is not None:
            self.store.close()
            self.store = None


def exposure(cfg: Config, host: str) -> None:
    """Say loudly, at start, what a server listening beyond loopback leaves open."""
    sec = cfg.security
    local = host == "localhost" or is_loopback(host)
    fields: dict[str, Any] = {"event": "exposure", "host": host,
                              "api_keys": len(sec.apiKeys),
                              "admin": "token" if cfg.admin_token() else (
                                  "admin keys" if sec.apiKeys else "loopback only")}
    if sec.apiKeys:
        fields["metrics"] = "public" if cfg.metrics.public else "admin keys or token"
        log.warning("API keys required on every route but /, /health*", extra=fields)
        return
    fields["inference"] = "open to every client"
    fields["management"] = ("OPEN to every client" if sec.openManagement
                            else "loopback clients only")
    fields["metrics"] = "open"
    if local:
        log.info("no API keys configured; listening on loopback only", extra=fields)
        return
    log.warning("NO API KEYS: anyone who can reach this port can run inference on every node"
                + ("; model management (pull, push, create, copy, delete) is OPEN to them too"
                   if sec.openManagement else
                   "; model management is refused beyond loopback")
                + "; set security.apiKeys (ollama-lb new-key NAME) to require keys", extra=fields)
