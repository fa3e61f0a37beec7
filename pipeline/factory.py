"""PipelineFactory: builds and owns one pipeline with its registry, checker and metrics.

The library entry point, as the seed's ``PipelineFactory``::

    with PipelineFactory.create("config.yaml").start() as factory:
        reply = factory.pipeline.submit(InferenceRequest.of_prompt("llama3", "Hi")).result()
"""

from __future__ import annotations

import os
from typing import Any

from pipeline.aggregate import PoolLists
from pipeline.config import Config, load_config, with_restart_keys_from
from pipeline.fanout import FanOut
from pipeline.health import HealthChecker
from pipeline.management import Management
from pipeline.metrics import MetricsRegistry
from pipeline.operations import PoolOperations
from pipeline.pipeline import Pipeline
from pipeline.reconciler import Reconciler
from pipeline.registry import NodeRegistry
from pipeline.upstream import UpstreamClient


class PipelineFactory:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.upstream = UpstreamClient()
        self.node_registry = NodeRegistry(config)
        self.metrics_registry = MetricsRegistry(config.metrics.prefix)
        self.pipeline = Pipeline(config, self.node_registry, self.metrics_registry,
                                 self.upstream)
        self.health_checker = HealthChecker(self.node_registry, self.upstream, config,
                                            on_change=self._health_round)
        self.pool_lists = PoolLists(self.node_registry, self.health_checker)
        self.fan_out: FanOut = self.pipeline.fan_out
        self.fan_out.refresh = self.health_checker.discover
        self.fan_out.settings = lambda: self.config
        # model management in the pipeline's books; the placement of models: (reconciler)
        self.management = Management(self.pipeline.ledger, self.metrics_registry,
                                     self.pipeline.streams, lambda: self.pipeline.accepting)
        self.placement = Reconciler(self.node_registry, self.fan_out, lambda: self.config,
                                    self.metrics_registry)
        self.pipeline.dispatcher.prepare_body = self.placement.with_keep_alive
        self.operations = PoolOperations(self.node_registry, self.pipeline,
                                         self.pipeline.offer_capacity)
        self.shared = None  # sharedState.redisUrl: node caps counted across instances
        if config.sharedState.redisUrl:
            from pipeline.shared.attach import attach  # redis-py only when configured

            self.shared = attach(lambda: self.config, self.node_registry,
                                 self.pipeline.dispatcher, self.metrics_registry,
                                 probe=self.health_checker.probe_now)
            self.operations.shared_status = self.shared.status
        self.started = False

    @classmethod
    def create(cls, source: str | os.PathLike[str] | Config) -> PipelineFactory:
        """From a config file path or an already-validated Config."""
        config = source if isinstance(source, Config) else load_config(source)
        return cls(config)

    def start(self, health_checks: bool = True) -> PipelineFactory:
        """Start the stage greenlets and, unless told not to, the health checker."""
        if self.shared is not None:
            self.shared.start()
        self.pipeline.start()
        if health_checks:
            self.health_checker.start()
        self.placement.start()
        self.started = True
        return self

    def stop(self) -> None:
        self.placement.stop()
        self.health_checker.stop()
        self.pipeline.stop()
        if self.shared is not None:
            self.shared.stop()
        self.upstream.close()
        self.started = False

    def __enter__(self) -> PipelineFactory:
        if not self.started:
            self.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def apply_config(self, config: Config) -> dict[str, Any]:
        """Apply a validated reload in place; restart-only keys keep their running values."""
        config = with_restart_keys_from(self.config, config)
        old_urls = {n.id: n.url for n in self.node_registry.all_nodes()}
        changes: dict[str, Any] = self.node_registry.apply(config)
        for node in self.node_registry.all_nodes():
            if node.id in old_urls and old_urls[node.id] != node.url:
                self.upstream.forget(old_urls[node.id])
        self.config = config
        self.health_checker.config = config
        self.pipeline.apply_config(config)
        self.placement.apply_config(config)
        return changes

    def _health_round(self) -> None:
        """After each round of health checks: capacity may be back, placement may be off."""
        self.pipeline.offer_capacity()
        self.placement.poke()
