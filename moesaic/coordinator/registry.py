"""The expert registry: which nodes serve which models, how each replica is doing, what it costs.

An **expert** is a model (its name is the expert id, the unit the gate weighs and MoE² selects);
each node serving that model holds one **replica** of it. Replicas come from each node's
``Describe`` merged with the fleet config's per-model overrides. :meth:`Registry.experts`
offers every expert of a task through one replica, the one with the earliest expected
completion (see :class:`~moesaic.coordinator.profiles.Profile`), so a request never runs the
same model twice and load spreads over replicas; a stream with temporal state (a
``sensor_id`` parameter) keeps its replica while that replica is eligible.

Health: a node that is unreachable (UNAVAILABLE: connection refused, no route), or whose calls
fail in transport ``failures_to_down`` times in a row, is marked down; a replica that misses
a deadline is marked *suspect*. Either leaves the pool until a ``Describe`` probe of its node
succeeds (suspect replicas are still used when a task has nothing else). A node whose
``Describe`` times out is busy, not gone: it stays up. Error replies never change health.

>>> async with Registry(load_fleet(Path("fleet.yaml"))) as registry:    # doctest: +SKIP
...     [e.id for e in registry.experts("detection")]
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import grpc

from moesaic.coordinator.config import FleetConfig, NodeEntry
from moesaic.coordinator.profiles import Profile
from moesaic.coordinator.selection import ExpertCost
from moesaic.metrics import Metrics
from moesaic.nodes.client import InferResult, NodeClient

__all__ = ["Expert", "NodeState", "Registry", "Replica"]

log = logging.getLogger(__name__)


@dataclass(eq=False)
class Replica:
    """One node's copy of a model, with its live cost profile."""

    node: str
    model: str
    task: str
    device: str
    """Queue key: replicas with the same device run one after another."""
    profile: Profile
    weight: float = 1.0
    class_names: tuple[str, ...] = ()
    suspect: bool = False
    version: str = ""
    """The model version the node serves (Describe); a new one starts a fresh profile."""

    @property
    def id(self) -> str:
        return f"{self.node}/{self.model}"


@dataclass(frozen=True, eq=False)
class Expert:
    """A model offered through one replica, with that replica's predicted cost now."""

    id: str
    task: str
    replica: Replica
    latency_ms: float
    """Predicted latency of a call sent now: expected wait + service + network."""
    energy_mj: float
    weight: float = 1.0
    class_names: tuple[str, ...] = ()

    @property
    def device(self) -> str:
        return self.replica.device

    @property
    def node(self) -> str:
        return self.replica.node

    @property
    def model(self) -> str:
        return self.replica.model

    def cost(self) -> ExpertCost:
        """The replica's cost on an idle device (what the cached coarse selection uses)."""
        p = self.replica.profile
        return ExpertCost(self.id, self.device, p.latency_ms, p.energy_mj)


@dataclass
class NodeState:
    entry: NodeEntry
    name: str
    client: NodeClient
    up: bool = False
    failures: int = 0
    last_error: str = ""
    device_kind: str = ""
    replicas: dict[str, Replica] = field(default_factory=dict)
    probing: bool = False


class Registry:
    """Nodes, their replicas and profiles; an async context manager (opens channels, probes)."""

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
        self._affinity: dict[tuple[str, str], str] = {}
        self._probe: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[bool]] = set()

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
        tasks = [t for t in (self._probe, *self._probes) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._probe = None
        for node in self.nodes:
            await node.client.close()

    # -- queries -----------------------------------------------------------------------
    def replicas(self, task: str | None = None, *, include_down: bool = False) -> list[Replica]:
        """Replicas of ``task`` (all tasks when None) on nodes that are up, ordered by id."""
        out = [
            r
            for node in self.nodes
            if node.up or include_down
            for r in node.replicas.values()
            if task is None or r.task == task
        ]
        return sorted(out, key=lambda r: r.id)

    def experts(
        self,
        task: str,
        *,
        avoid: Collection[str] = (),
        sensor: str = "",
        now: float | None = None,
    ) -> list[Expert]:
        """Each expert of ``task`` through its best replica now, ordered by id.

        ``avoid``: replica ids not to offer (already failed in this request); ``sensor``: keep
        this sensor's replica of each model while it is eligible (temporal state).
        """
        now = time.monotonic() if now is None else now
        eligible = [r for r in self.replicas(task) if r.id not in avoid]
        healthy = [r for r in eligible if not r.suspect] or eligible
        by_model: dict[str, list[Replica]] = {}
        for r in healthy:
            by_model.setdefault(r.model, []).append(r)
        out = []
        for model, group in sorted(by_model.items()):
            chosen = self._pinned(model, sensor, group) or min(
                group, key=lambda r: (r.profile.completion_ms(now), r.profile.in_flight, r.id)
            )
            out.append(self.offer(chosen, now))
        return out

    def offer(self, replica: Replica, now: float | None = None) -> Expert:
        """``replica``'s model as an expert served by it, with its predicted cost now."""
        p = replica.profile
        now = time.monotonic() if now is None else now
        return Expert(
            replica.model,
            replica.task,
            replica,
            p.completion_ms(now),
            p.energy_mj,
            replica.weight,
            replica.class_names,
        )

    def _pinned(self, model: str, sensor: str, group: list[Replica]) -> Replica | None:
        if not sensor:
            return None
        pinned = self._affinity.get((model, sensor))
        return next((r for r in group if r.id == pinned), None)

    def pin(self, expert: Expert, sensor: str) -> None:
        """Keep ``sensor``'s frames of this model on the replica that served it."""
        if sensor:
            self._affinity[(expert.id, sensor)] = expert.replica.id

    def node_of(self, replica: Replica) -> NodeState:
        for node in self.nodes:
            if node.name == replica.node:
                return node
        raise LookupError(f"unknown node {replica.node!r}")

    def client(self, replica: Replica) -> NodeClient:
        return self.node_of(replica).client

    def tasks(self) -> set[str]:
        return {r.task for r in self.replicas()}

    # -- updates -----------------------------------------------------------------------
    def observe(self, replica: Replica, result: InferResult, round_trip_ms: float) -> None:
        """Fold one successful reply into the replica's profile and its node's health."""
        if replica.profile.observe(result, round_trip_ms, self.settings.ewma_alpha):
            self.epoch += 1
        self.node_of(replica).failures = 0

    def observe_timeout(self, replica: Replica, waited_ms: float) -> None:
        """A missed deadline: the replica is slow or hung. It is predicted to take at least
        ``waited_ms`` for a while, and is suspect (skipped) until its node answers a probe; the
        node stays up."""
        replica.profile.observe_timeout(waited_ms, time.monotonic())
        node = self.node_of(replica)
        node.last_error = f"{replica.model}: deadline after {waited_ms:.0f} ms"
        if not replica.suspect:
            replica.suspect = True
            self.epoch += 1
            log.info("replica %s suspect: %s", replica.id, node.last_error)
        self._probe_soon(node)

    def record_expert_error(self, replica: Replica, error: str) -> None:
        """The node answered with an error for this replica (bad input, engine failure): the
        node is alive, so this does not count towards ``failures_to_down``."""
        self.node_of(replica).last_error = f"{replica.model}: {error}"

    def record_failure(self, replica: Replica, error: str, *, unreachable: bool = False) -> None:
        """One transport failure (UNAVAILABLE); the node goes down when unreachable or after
        ``failures_to_down`` of them in a row."""
        node = self.node_of(replica)
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

    def _gauge(self, node: NodeState, value: int) -> None:
        if self.metrics is not None:
            for r in node.replicas.values():
                self.metrics.experts_up.labels(expert=r.id).set(value)

    # -- discovery ---------------------------------------------------------------------
    async def _describe(self, node: NodeState) -> bool:
        t0 = time.perf_counter()
        try:
            desc = await node.client.describe(timeout=self.settings.describe_timeout_s)
        except Exception as exc:  # grpc.aio.AioRpcError, OSError: the node is not reachable
            node.last_error = f"describe failed: {_short(exc)}"
            if node.up and _busy(exc):
                # Slow to answer under load, not gone: its replicas stay (suspect ones skipped).
                log.debug("node %s (%s) busy: %s", node.name, node.entry.address, _short(exc))
                return False
            log.info("node %s (%s) not reachable: %s", node.name, node.entry.address, _short(exc))
            self.mark_down(node, node.last_error)
            return False
        changed = self._merge(node, desc, (time.perf_counter() - t0) * 1e3)
        node.failures = 0
        for r in node.replicas.values():
            if r.suspect:
                log.info("replica %s healthy again (its node answered a probe)", r.id)
                r.suspect, changed = False, True
        if not node.up:
            log.info("node %s (%s) up with %d models", node.name, node.entry.address, len(node.replicas))
            node.up, changed = True, True
            self._gauge(node, 1)
        if changed:
            self.epoch += 1
        return True

    def _merge(self, node: NodeState, desc: Any, round_trip_ms: float) -> bool:
        """Take ``desc`` (a ``NodeDescription``) in; True when a replica came or went."""
        entry = node.entry
        if entry.name is None and desc.node_id:
            node.name = desc.node_id
        device_id = desc.device.id or desc.device.kind or "cpu"
        queue = entry.device or f"{node.name}/{device_id}"
        node.device_kind = desc.device.kind
        overrides = {o.model: o for o in entry.experts}
        seen = set()
        changed = False
        now = time.monotonic()
        for model in desc.models:
            override = overrides.get(model.name)
            if (entry.only_listed and override is None) or (override is not None and not override.enabled):
                continue
            if not model.ready and model.state != "ready":
                continue
            seen.add(model.name)
            existing = node.replicas.get(model.name)
            if existing is not None and existing.node == node.name and existing.version != model.version:
                log.info(
                    "replica %s now serves version %s (was %s): its learned profile starts again",
                    existing.id,
                    model.version or "?",
                    existing.version or "?",
                )
                existing = None  # another model behind the same name: rebuilt below from the prior
            if existing is not None and existing.node == node.name:
                existing.profile.report_wait(model.expected_wait_ms, now)
                existing.profile.refresh(model, override, now)
                continue  # keep the live profile learned from replies
            changed = True
            node.replicas[model.name] = Replica(
                node=node.name,
                model=model.name,
                task=(override.task if override is not None and override.task else model.task),
                device=queue,
                profile=Profile.prior(model, override, self.settings, round_trip_ms),
                weight=override.weight if override is not None else 1.0,
                class_names=tuple(model.class_names),
                version=model.version,
            )
        for name in list(node.replicas):
            if name not in seen:
                del node.replicas[name]
                changed = True
        return changed

    def _probe_soon(self, node: NodeState) -> None:
        """Probe ``node`` now (once at a time) so a suspect replica comes back quickly."""
        if node.probing:
            return
        node.probing = True

        async def probe() -> bool:
            try:
                await asyncio.sleep(min(self.settings.probe_interval_s, 0.25))
                return await self._describe(node)
            finally:
                node.probing = False

        task = asyncio.get_running_loop().create_task(probe(), name=f"moesaic-probe-{node.name}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.probe_interval_s)
            due = [n for n in self.nodes if not n.probing]  # the up ones too: queue waits, priors
            if due:
                await asyncio.gather(*(self._describe(n) for n in due), return_exceptions=True)


def _busy(exc: BaseException) -> bool:
    """A Describe that timed out: the node is alive but its server is saturated."""
    code = getattr(exc, "code", None)
    return callable(code) and code() == grpc.StatusCode.DEADLINE_EXCEEDED


def _short(exc: BaseException) -> str:
    details = getattr(exc, "details", None)
    if callable(details):
        with contextlib.suppress(Exception):
            return str(details())
    return str(exc)
