"""The placement reconciler: one greenlet that keeps the pool as ``models:`` describes it.

Each pass computes the plan (``pipeline.placement``) from what discovery last saw and starts,
for every model that needs it and has no action under way, one action: a pull onto the nodes
that lack it (a pool-wide pull, with its merged progress), else a warm-up where it is not
loaded, else (``prune: true`` only) deletes. When an action ends the reconciler passes again
at once, so a model goes pull -> warm -> converged without waiting a period. It passes after
start, on every reload and health round (a node that recovers or joins is seen there; so is
a node that lost a model, at its next discovery), and every ``placement.intervalMs``.
A failed action is retried with a backoff (one interval, doubling, at most ten). Its plan and
progress are log events (``placement_plan``, ``placement_action``) and ``status()``, which
``GET /admin/models`` shows.

It also keeps each model's ``keepAlive``: ``with_keep_alive`` gives a request that carries no
``keep_alive`` the configured one, so that a request does not reset the model's timer to the
node's default (the model-routed path calls it).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gevent
from gevent.event import Event
from gevent.pool import Group

from pipeline.config import Config, ModelConfig
from pipeline.fanout import FanOut
from pipeline.metrics import MetricsRegistry
from pipeline.modelname import canonical
from pipeline.node import Node
from pipeline.placement import KEEP_ALIVE_PATHS, ModelPlan, Plan, inject_keep_alive, make_plan
from pipeline.placement import usable as usable_node
from pipeline.progressrun import ProgressRun
from pipeline.registry import NodeRegistry

log = logging.getLogger("ollama_lb.placement")
PRUNE = "(prune)"  # the job key of deletes of models the config does not name
VERBS = {"pull": "pulling onto", "warm": "warming on", "delete": "deleting from"}


@dataclass
class ModelState:
    """What the reconciler is doing for one model, and how its last action went."""

    action: str | None = None  # pull, warm or delete while one runs
    nodes: tuple[str, ...] = ()
    run: ProgressRun | None = None  # a pull under way (its merged progress)
    last_error: str | None = None
    failures: int = 0  # consecutive failed actions
    retry_at: float = 0.0  # monotonic: no new action before
    last_done: float | None = None  # wall clock of the last successful action

    def doing(self) -> str | None:
        if self.action is None:
            return None
        text = f"{VERBS[self.action]} {', '.join(self.nodes)}"
        done = self.run.merge.fraction() if self.run is not None else None
        return f"{text} ({done:.0%})" if done is not None else text


class Reconciler:
    def __init__(self, registry: NodeRegistry, fan_out: FanOut, settings: Callable[[], Config],
                 metrics: MetricsRegistry) -> None:
        self.registry = registry
        self.fan_out = fan_out
        self.settings = settings
        self.metrics = metrics
        self.state: dict[str, ModelState] = {}  # by canonical model (and PRUNE)
        self.plan: Plan | None = None
        self._logged: dict[str, tuple[Any, ...]] = {}  # the plan last logged, per model
        self._jobs: dict[str, gevent.Greenlet] = {}
        self._group = Group()
        self._wake = Event()
        self._greenlet: gevent.Greenlet | None = None
        #: False: plan and report only, start no action. Only one process may act on a pool
        #: (one worker of ``server.workers``, one appliance of several sharing the nodes)
        self.active = True

    # --- lifecycle ----------------------------------------------------------------------------

    def start(self) -> None:
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)
            self._greenlet.name = "placement-reconciler"

    def stop(self) -> None:
        if self._greenlet is not None:
            self._greenlet.kill()
            self._greenlet = None
        self._group.kill(block=True, timeout=5)
        self._jobs.clear()

    def poke(self) -> None:
        """Pass soon (a health round, a reload, an action that ended)."""
        self._wake.set()

    def apply_config(self, config: Config) -> None:
        """A reload may fix what failed: retry at once."""
        for state in self.state.values():
            state.retry_at = 0.0
        self.poke()

    def _loop(self) -> None:
        while True:
            self._wake.clear()
            try:
                self.reconcile()
            except Exception:  # never let the reconciler die
                log.exception("placement pass failed")
            self._wake.wait(self.settings().placement.intervalMs / 1000.0)

    # --- one pass -----------------------------------------------------------------------------

    def reconcile(self) -> Plan:
        """Plan, and start the actions that are due; returns the plan."""
        cfg = self.settings()
        plan = make_plan(cfg.models, self.registry.all_nodes(), cfg.placement.prune)
        self.plan = plan
        now = time.monotonic()
        for mp in plan.models:
            self._log_plan(mp)
            state = self.state.setdefault(mp.model, ModelState())
            if self.active and mp.actions and not self._busy(mp.model) and now >= state.retry_at:
                self._spawn(mp.model, self._act, mp)
        if self.active and plan.prune and not self._busy(PRUNE) and now >= self.state.setdefault(
                PRUNE, ModelState()).retry_at:
            self._spawn(PRUNE, self._prune, plan.prune)
        return plan

    def _busy(self, key: str) -> bool:
        job = self._jobs.get(key)
        return job is not None and not job.dead

    def _spawn(self, key: str, fn: Callable[..., None], arg: Any) -> None:
        self._jobs[key] = self._group.spawn(fn, arg)

    def _log_plan(self, mp: ModelPlan) -> None:
        shown = (mp.targets, mp.pull, mp.warm, mp.delete, mp.waiting, mp.short)
        if self._logged.get(mp.model) != shown:
            self._logged[mp.model] = shown
            log.info("placement plan", extra={
                "event": "placement_plan", "model": mp.name, "want": mp.want,
                "targets": list(mp.targets), "installed": list(mp.installed),
                "pull": list(mp.pull), "warm": list(mp.warm), "delete": list(mp.delete),
                "waiting": list(mp.waiting), "short": mp.short, "converged": mp.converged})

    # --- actions ------------------------------------------------------------------------------

    def _act(self, mp: ModelPlan) -> None:
        action, ids = (("pull", mp.pull) if mp.pull else ("warm", mp.warm) if mp.warm
                       else ("delete", mp.delete))
        nodes = [n for i in ids if (n := self.registry.get(i)) is not None]
        cfg = self._config_of(mp.model)
        self._run(mp.model, action, ids, lambda state: self._do(action, mp.name, nodes, cfg,
                                                                 state))

    def _prune(self, doomed: dict[str, tuple[str, ...]]) -> None:
        def delete_all(state: ModelState) -> str | None:
            errors = []
            for node_id, models in doomed.items():
                node = self.registry.get(node_id)
                for model in models if node is not None else ():
                    errors += self.fan_out.delete_on(model, [node])
            return "; ".join(errors) or None

        self._run(PRUNE, "delete", tuple(doomed), delete_all)

    def _do(self, action: str, name: str, nodes: list[Node], cfg: ModelConfig | None,
            state: ModelState) -> str | None:
        """Run one action; None when it worked, else why not."""
        if action == "pull":
            run = state.run = self.fan_out.progress("/api/pull", {"model": name}, nodes)
            try:
                run.join()
            finally:
                run.close()
            return None if run.merge.ok else run.merge.failure()
        if action == "warm":
            keep = cfg.keepAlive if cfg is not None and cfg.keepAlive else -1
            return "; ".join(self.fan_out.warm(name, nodes, keep)) or None
        return "; ".join(self.fan_out.delete_on(name, nodes)) or None

    def _run(self, key: str, action: str, ids: tuple[str, ...],
             work: Callable[[ModelState], str | None]) -> None:
        state = self.state.setdefault(key, ModelState())
        state.action, state.nodes = action, ids
        log.info("placement action", extra={"event": "placement_action", "model": key,
                                            "action": action, "nodes": list(ids),
                                            "phase": "start"})
        try:
            error = work(state)
        except Exception as exc:  # a bug: record it, retry later
            log.exception("placement action failed")
            error = f"internal error: {exc}"
        finally:
            state.action, state.run = None, None
        self._record(key, action, ids, state, error)
        self.poke()  # the next step (warm after pull), or the next model

    def _record(self, key: str, action: str, ids: tuple[str, ...], state: ModelState,
                error: str | None) -> None:
        self.metrics.placement_actions(action, "failed" if error else "success").inc()
        interval = self.settings().placement.intervalMs / 1000.0
        if error is None:
            state.failures, state.last_error, state.last_done = 0, None, time.time()
        else:
            state.failures += 1
            state.last_error = error
            state.retry_at = time.monotonic() + min(interval * 2 ** (state.failures - 1),
                                                    10 * interval)
        log.log(logging.WARNING if error else logging.INFO, "placement action ended", extra={
            "event": "placement_action", "model": key, "action": action, "nodes": list(ids),
            "phase": "failed" if error else "done", "error": error})

    # --- what others ask ----------------------------------------------------------------------

    def _config_of(self, model: str) -> ModelConfig | None:
        key = canonical(model)
        return next((m for m in self.settings().models if canonical(m.name) == key), None)

    def keep_alive_for(self, model: str) -> str | None:
        """The configured ``keepAlive`` of a model (any spelling of its name), if any."""
        cfg = self._config_of(model) if model else None
        return cfg.keepAlive if cfg is not None else None

    def with_keep_alive(self, path: str, body: bytes, model: str) -> bytes:
        """The body a model-routed request should be sent with: ``keep_alive`` added when the
        client gave none and the model has a ``keepAlive`` (native generate, chat, embed)."""
        if not self.settings().models or path not in KEEP_ALIVE_PATHS:
            return body  # the common case costs two lookups
        value = self.keep_alive_for(model)
        return inject_keep_alive(body, value) if value else body

    def pull_targets(self, model: str) -> list[Node] | None:
        """Where a client's pull of a configured model goes: its targets, and every node that
        has it (a pull also updates); None for a model the config does not name."""
        cfg = self._config_of(model)
        if cfg is None:
            return None
        nodes = self.registry.all_nodes()
        mp = make_plan((cfg,), nodes, prune=False).models[0]
        wanted = set(mp.targets) | set(mp.installed)
        return [n for n in nodes if n.id in wanted and usable_node(n)]

    def status(self) -> dict[str, Any]:
        """Per model: where it is installed and loaded, its targets, what is being done."""
        cfg = self.settings()
        plan = make_plan(cfg.models, self.registry.all_nodes(), cfg.placement.prune)
        return {"prune": cfg.placement.prune, "intervalMs": cfg.placement.intervalMs,
                "active": self.active,
                "models": [self._model_status(m, mp) for m, mp in zip(cfg.models, plan.models,
                                                                     strict=True)],
                "unmanaged": [{"model": m, "installed": list(ids)}
                              for m, ids in sorted(plan.unmanaged.items())],
                "pruning": self._state_doc(self.state.get(PRUNE)) if cfg.placement.prune
                else None}

    def _model_status(self, cfg: ModelConfig, mp: ModelPlan) -> dict[str, Any]:
        state = self.state.get(mp.model) or ModelState()
        if state.action is not None:
            phase = {"pull": "pulling", "warm": "warming", "delete": "deleting"}[state.action]
        elif mp.converged:
            phase = "converged"
        elif state.last_error is not None:
            phase = "failed"
        elif mp.waiting or mp.short:
            phase = "waiting"
        else:
            phase = "pending"
        return {"name": cfg.name, "model": mp.model, "want": mp.want,
                "targets": list(mp.targets), "installed": list(mp.installed),
                "loaded": list(mp.loaded), "warm": cfg.warm, "keepAlive": cfg.keepAlive,
                "state": phase, "plan": {"pull": list(mp.pull), "warm": list(mp.warm),
                                         "delete": list(mp.delete),
                                         "waiting": list(mp.waiting), "short": mp.short},
                **self._state_doc(state)}

    @staticmethod
    def _state_doc(state: ModelState | None) -> dict[str, Any]:
        state = state or ModelState()
        return {"doing": state.doing(), "lastError": state.last_error,
                "failures": state.failures, "lastDone": state.last_done}
