"""The expert registry: experts = (node, model) pairs, their live cost profiles and node health.

Experts come from each node's ``Describe`` (task, device, measured latency/energy profile)
merged with the fleet config's per-model overrides. Every reply updates the expert's profile
(EWMA of measured latency and energy), so the cost model tracks reality; a missed deadline
raises the expert's live latency and nothing else. A node that is unreachable (UNAVAILABLE:
connection refused, no route), or whose calls fail in transport ``failures_to_down`` times
in a row, is marked down: its experts leave the pool until a periodic ``Describe`` probe
succeeds again. Deadline misses and error replies never mark a node down.

>>> async with Registry(load_fleet(Path("fleet.yaml"))) as registry:    # doctest: +SKIP
...     [e.id for e in registry.experts("detection")]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from moesaic.coordinator.config import FleetConfig, NodeEntry
from moesaic.coordinator.selection import ExpertCost
from moesaic.metrics import Metrics
from moesaic.nodes.client import NodeClient

__all__ = ["Expert", "NodeState", "Registry"]

log = logging.getLogger(__name__)


@dataclass
class Expert:
    """One (node, model) pair with its live profile."""

    id: str
    node: str
    model: str
    task: str
    device: str
    """Queue key: experts with the same device run one after another."""
    latency_ms: float
    energy_mj: float
    energy_source: str = "estimate"
    weight: float = 1.0
    class_names: tuple[str, ...] = ()
    replies: int = 0
    anchor: tuple[float, float] = (0.0, 0.0)

    def cost(self) -> ExpertCost:
        return ExpertCost(self.id, self.device, self.latency_ms, self.energy_mj)


@dataclass
class NodeState:
    entry: NodeEntry
    name: str
    client: NodeClient
    up: bool = False
    failures: int = 0
    last_error: str = ""
    device_kind: str = ""
    experts: dict[str, Expert] = field(default_factory=dict)


class Registry:
    """Nodes, their experts and profiles; an async context manager (opens channels, probes)."""

    def __init__(self, config: FleetConfig, *, metrics: Metrics | None = None) -> None:
        self.config = config
        self.settings = config.coordinator
        self.metrics = metrics
        self.nodes: list[NodeState] = [
            NodeState(entry, entry.name or entry.address, NodeClient(entry.address, tls=entry.tls))
            for entry in config.nodes
        ]
        self.epoch = 0
        """Bumped whenever the pool or a profile changes enough to invalidate cached selections."""
        self._probe: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    async def __aenter__(self) -> Registry:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> None:
        for node in self.nodes:
            await node.client.__aenter__()
        await asyncio.gather(*(self._describe(node) for node in self.nodes))
        self._probe = asyncio.create_task(self._probe_loop(), name="moesaic-registry-probe")

    async def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
            self._probe = None
        for node in self.nodes:
            await node.client.close()

    # -- queries -----------------------------------------------------------------------
    def experts(self, task: str | None = None, *, include_down: bool = False) -> list[Expert]:
        """Experts of ``task`` (all tasks when None) in the pool, ordered by id."""
        out = [
            e
            for node in self.nodes
            if node.up or include_down
            for e in node.experts.values()
            if task is None or e.task == task
        ]
        return sorted(out, key=lambda e: e.id)

    def get(self, expert_id: str) -> Expert:
        for node in self.nodes:
            for e in node.experts.values():
                if e.id == expert_id:
                    return e
        raise LookupError(f"unknown expert {expert_id!r}")

    def node_of(self, expert: Expert) -> NodeState:
        for node in self.nodes:
            if node.name == expert.node:
                return node
        raise LookupError(f"unknown node {expert.node!r}")

    def client(self, expert: Expert) -> NodeClient:
        return self.node_of(expert).client

    def tasks(self) -> set[str]:
        return {e.task for e in self.experts()}

    # -- updates -----------------------------------------------------------------------
    def observe(self, expert: Expert, latency_ms: float, energy_mj: float, energy_source: str) -> None:
        """Fold one successful reply into the expert's profile and its node's health."""
        alpha = self.settings.ewma_alpha
        if math.isfinite(latency_ms) and latency_ms >= 0:
            expert.latency_ms += alpha * (latency_ms - expert.latency_ms)
        if math.isfinite(energy_mj) and energy_mj >= 0:
            expert.energy_mj += alpha * (energy_mj - expert.energy_mj)
            if energy_source:
                expert.energy_source = energy_source
        expert.replies += 1
        self._check_drift(expert)
        node = self.node_of(expert)
        node.failures = 0

    def observe_timeout(self, expert: Expert, waited_ms: float) -> None:
        """A missed deadline: the call took at least ``waited_ms``. The expert is slow, not gone:
        its live latency moves towards ``waited_ms`` (so tight budgets stop choosing it) and its
        node stays up."""
        if math.isfinite(waited_ms) and waited_ms > expert.latency_ms:
            expert.latency_ms += self.settings.ewma_alpha * (waited_ms - expert.latency_ms) * 2
            expert.latency_ms = min(expert.latency_ms, waited_ms)
            self._check_drift(expert)
        self.node_of(expert).last_error = f"{expert.model}: deadline after {waited_ms:.0f} ms"

    def record_expert_error(self, expert: Expert, error: str) -> None:
        """The node answered with an error for this expert (bad input, engine failure): the node
        is alive, so this does not count towards ``failures_to_down``."""
        self.node_of(expert).last_error = f"{expert.model}: {error}"

    def record_failure(self, expert: Expert, error: str, *, unreachable: bool = False) -> None:
        """One transport failure (UNAVAILABLE); the node goes down when unreachable or after
        ``failures_to_down`` of them in a row."""
        node = self.node_of(expert)
        node.failures += 1
        node.last_error = error
        if unreachable or node.failures >= self.settings.failures_to_down:
            self.mark_down(node, error)

    def mark_down(self, node: NodeState, reason: str) -> None:
        if node.up:
            log.warning("node %s (%s) down: %s", node.name, node.entry.address, reason)
            node.up = False
            self.epoch += 1
            self._gauge(node, 0)

    def _check_drift(self, expert: Expert) -> None:
        lat0, en0 = expert.anchor
        drift = self.settings.profile_drift
        if abs(expert.latency_ms - lat0) > drift * max(lat0, 1.0) or abs(
            expert.energy_mj - en0
        ) > drift * max(en0, 1.0):
            expert.anchor = (expert.latency_ms, expert.energy_mj)
            self.epoch += 1

    def _gauge(self, node: NodeState, value: int) -> None:
        if self.metrics is not None:
            for e in node.experts.values():
                self.metrics.experts_up.labels(expert=e.id).set(value)

    # -- discovery ---------------------------------------------------------------------
    async def _describe(self, node: NodeState) -> bool:
        try:
            desc = await node.client.describe(timeout=self.settings.describe_timeout_s)
        except Exception as exc:  # grpc.aio.AioRpcError, OSError: the node is not reachable
            node.last_error = f"describe failed: {exc}"
            log.info("node %s (%s) not reachable: %s", node.name, node.entry.address, _short(exc))
            self.mark_down(node, node.last_error)
            return False
        self._merge(node, desc)
        node.failures = 0
        if not node.up:
            log.info("node %s (%s) up with %d experts", node.name, node.entry.address, len(node.experts))
            node.up = True
            self.epoch += 1
            self._gauge(node, 1)
            self._changed.set()
        return True

    def _merge(self, node: NodeState, desc: Any) -> None:
        entry = node.entry
        if entry.name is None and desc.node_id:
            node.name = desc.node_id
        device_id = desc.device.id or desc.device.kind or "cpu"
        queue = entry.device or f"{node.name}/{device_id}"
        node.device_kind = desc.device.kind
        overrides = {o.model: o for o in entry.experts}
        seen = set()
        for model in desc.models:
            override = overrides.get(model.name)
            if (entry.only_listed and override is None) or (override is not None and not override.enabled):
                continue
            if not model.ready and model.state != "ready":
                continue
            seen.add(model.name)
            profile = min(model.profiles, key=lambda p: p.batch_size or 1) if model.profiles else None
            latency = (
                override.latency_ms
                if override is not None and override.latency_ms is not None
                else (profile.latency_ms.p50 if profile is not None and profile.latency_ms.p50 > 0 else None)
            )
            energy = (
                override.energy_mj
                if override is not None and override.energy_mj is not None
                else (profile.energy_mj_per_inference if profile is not None else None)
            )
            existing = node.experts.get(model.name)
            expert_id = f"{node.name}/{model.name}"
            if existing is not None and existing.id == expert_id and existing.replies:
                continue  # keep the live profile learned from replies
            expert = Expert(
                id=expert_id,
                node=node.name,
                model=model.name,
                task=(override.task if override is not None and override.task else model.task),
                device=queue,
                latency_ms=float(latency if latency is not None else self.settings.default_latency_ms),
                energy_mj=float(energy if energy is not None else self.settings.default_energy_mj),
                energy_source=(
                    profile.energy_source if profile is not None and profile.energy_source else "estimate"
                ),
                weight=override.weight if override is not None else 1.0,
                class_names=tuple(model.class_names),
            )
            expert.anchor = (expert.latency_ms, expert.energy_mj)
            node.experts[model.name] = expert
        for name in list(node.experts):
            if name not in seen:
                del node.experts[name]
        self.epoch += 1

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            down = [n for n in self.nodes if not n.up]
            if down:
                await asyncio.gather(*(self._describe(n) for n in down), return_exceptions=True)

    async def wait_changed(self, timeout: float) -> bool:
        """Wait until a node comes up (tests, startup); False on timeout."""
        self._changed.clear()
        try:
            await asyncio.wait_for(self._changed.wait(), timeout)
        except TimeoutError:
            return False
        return True


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details())
    return str(exc)
