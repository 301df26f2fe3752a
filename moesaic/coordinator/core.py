"""The transport-neutral coordinator: features -> gate -> select -> fan out -> failover -> fuse.

:class:`Coordinator` is what the gRPC service (and the MQTT bridge, in-process) calls::

    async with Coordinator(load_fleet(Path("fleet.yaml"))) as coordinator:
        perception = await coordinator.perceive(PerceiveInput(task="detection", inputs=...,
                                                              budget=Budget(latency_ms=80)))

Experts run in parallel over gRPC. Each has a deadline: with a bounded latency budget the
budget's end less what the quickest replacement would need, never earlier than
``deadline_slack`` x its predicted latency + ``deadline_margin_ms``; with no latency budget
``expert_timeout_ms``. An expert that errors or misses its deadline is dropped and the
coordinator reselects from the experts not yet tried, within what is left of the budget. A
missed deadline only teaches the expert's live latency (the node stays up); only transport
failures (UNAVAILABLE: refused, unreachable) take a node out of the pool. When nothing
has succeeded and nothing is running, the cheapest untried expert runs regardless of the
budget (``budget_met=False``); when every expert failed the request fails with
:class:`~moesaic.rpc.Unavailable`. Every call has a timeout, so nothing hangs.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import grpc
import numpy as np

from moesaic.coordinator.config import FleetConfig
from moesaic.coordinator.features import features_of
from moesaic.coordinator.fusion import FUSED_TASKS, ExpertOutput, Fused, fuse
from moesaic.coordinator.inputs import RequestInputs
from moesaic.coordinator.planner import Planner, TaskModel, load_task_models, set_cost
from moesaic.coordinator.registry import Expert, Registry
from moesaic.coordinator.selection import Budget
from moesaic.errors import DeadlineExceeded, InvalidInput, Unavailable
from moesaic.metrics import Metrics
from moesaic.nodes.client import InferResult

__all__ = ["Coordinator", "ExpertCall", "PerceiveInput", "Perception", "Run"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerceiveInput:
    task: str
    inputs: RequestInputs
    budget: Budget = field(default_factory=Budget)
    request_id: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    """Absolute ``time.monotonic()`` by which the caller gives up (its gRPC deadline)."""


@dataclass
class Run:
    """One expert's part in a request."""

    expert: Expert
    status: str = "ok"
    latency_ms: float = 0.0
    energy_mj: float = 0.0
    energy_measured: bool = False
    weight: float = 0.0
    error: str = ""
    tiles: int = 0


@dataclass
class Perception:
    request_id: str
    task: str
    runs: list[Run]
    fused: Fused
    predicted_latency_ms: float
    predicted_energy_mj: float
    measured_latency_ms: float
    measured_energy_mj: float
    energy_measured: bool
    budget_met: bool


@dataclass(frozen=True)
class ExpertCall:
    """The outcome of one expert call."""

    result: InferResult | None
    latency_ms: float
    status: str
    error: str = ""
    unreachable: bool = False


class Coordinator:
    """Registry + planner + fan-out; an async context manager."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        metrics: Metrics | None = None,
        task_models: Mapping[str, TaskModel] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.coordinator
        self.metrics = metrics
        self.registry = Registry(config, metrics=metrics)
        models = dict(task_models) if task_models is not None else load_task_models(config.tasks)
        self.planner = Planner(self.settings, self.registry, models)

    async def __aenter__(self) -> Coordinator:
        await self.registry.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.registry.close()

    # -- helpers -----------------------------------------------------------------------
    def features(self, task: str, inputs: RequestInputs) -> np.ndarray | None:
        tm = self.planner.task_model(task)
        if tm.gate is None:
            return None
        return features_of(tm.input_kind, inputs.tensors)

    def _deadline(
        self,
        expert: Expert,
        now: float,
        start: float,
        budget: Budget,
        capped: bool,
        outer: float | None,
        reserve_ms: float = 0.0,
    ) -> float:
        """When to stop waiting for ``expert`` (absolute ``time.monotonic()``).

        Unbounded latency budget, or an expert run regardless of the budget: ``expert_timeout_ms``.
        Bounded: the budget's end less ``reserve_ms`` (what a replacement needs to still make
        the budget), but never earlier than ``deadline_slack`` x the prediction +
        ``deadline_margin_ms``, so a generous budget or a stale prediction never drops an expert
        early. Always capped by ``expert_timeout_ms`` and the caller's own deadline.
        """
        settings = self.settings
        own = now + settings.expert_timeout_ms / 1e3
        if capped and budget.latency_ms > 0:
            floor = now + (settings.deadline_slack * expert.latency_ms + settings.deadline_margin_ms) / 1e3
            budget_end = start + (budget.latency_ms - settings.overhead_ms - reserve_ms) / 1e3
            own = min(own, max(floor, budget_end))
        if outer is not None:
            own = min(own, outer - 0.005)
        return max(own, now + 0.001)

    def _reserve_ms(self, task: str, exclude: set[str]) -> float:
        """Deadline of the quickest expert that could replace a dropped one (0 when none can)."""
        rest = self.planner.candidates(task, exclude=exclude)
        s = self.settings
        return min((s.deadline_slack * e.latency_ms + s.deadline_margin_ms for e in rest), default=0.0)

    async def call(self, expert: Expert, inputs: RequestInputs, timeout: float) -> ExpertCall:
        """One ModelInfer with ``timeout`` seconds; never raises, never outlives the timeout much."""
        t0 = time.perf_counter()
        client = self.registry.client(expert)
        try:
            result = await asyncio.wait_for(
                client.infer(
                    expert.model, inputs.tensors, parameters=inputs.parameters or None, timeout=timeout
                ),
                timeout + 0.5,
            )
        except grpc.aio.AioRpcError as exc:
            ms = (time.perf_counter() - t0) * 1e3
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return ExpertCall(None, ms, "deadline", f"no reply within {timeout * 1e3:.0f} ms")
            return ExpertCall(
                None, ms, "error", f"{code.name}: {exc.details()}", code == grpc.StatusCode.UNAVAILABLE
            )
        except TimeoutError:
            ms = (time.perf_counter() - t0) * 1e3
            return ExpertCall(None, ms, "deadline", f"no reply within {timeout * 1e3:.0f} ms")
        except Exception as exc:  # a bad reply must not fail the request: it is this expert's error
            ms = (time.perf_counter() - t0) * 1e3
            return ExpertCall(None, ms, "error", f"{type(exc).__name__}: {exc}")
        return ExpertCall(result, (time.perf_counter() - t0) * 1e3, "ok")

    def record(self, expert: Expert, run: Run, outcome: ExpertCall) -> None:
        """Fold one outcome into the run, the live profile, node health and metrics."""
        run.status = outcome.status
        run.latency_ms += outcome.latency_ms
        run.error = outcome.error
        if outcome.result is not None:
            res = outcome.result
            compute = res.compute_ms if math.isfinite(res.compute_ms) else outcome.latency_ms
            energy = res.energy_mj if math.isfinite(res.energy_mj) else expert.energy_mj
            run.energy_mj += energy
            run.energy_measured = res.energy_measured
            self.registry.observe(expert, compute, res.energy_mj, res.energy_source)
        elif outcome.status == "deadline":
            # Slow, not gone: the live profile learns the latency; the node stays up.
            run.energy_mj += expert.energy_mj  # it ran: count the predicted cost, marked estimated
            self.registry.observe_timeout(expert, outcome.latency_ms)
        elif outcome.unreachable:
            self.registry.record_failure(expert, outcome.error, unreachable=True)
        else:
            self.registry.record_expert_error(expert, outcome.error)
        if self.metrics is not None:
            self.metrics.expert_latency.labels(expert=expert.id).observe(outcome.latency_ms / 1e3)
            source = "measured" if run.energy_measured else "estimated"
            if outcome.status != "error":
                self.metrics.energy.labels(expert=expert.id, source=source).inc(max(run.energy_mj, 0.0) / 1e3)

    # -- perceive ----------------------------------------------------------------------
    async def perceive(self, request: PerceiveInput) -> Perception:
        """Run one request to a fused result; raises InvalidInput / Unavailable / DeadlineExceeded."""
        if request.task not in FUSED_TASKS:
            raise InvalidInput(f"task: {request.task!r} is not one of {list(FUSED_TASKS)}")
        if not self.planner.candidates(request.task):
            raise Unavailable(f"task {request.task!r}: no expert is up")
        budget = request.budget if request.budget.bounded else self._default_budget()
        start = time.monotonic()
        features = self.features(request.task, request.inputs)
        if request.task == "detection" and request.options.get("slice"):
            from moesaic.coordinator.sliced import sliced_perceive

            return await sliced_perceive(self, request, budget, features, start)
        runs, outputs, plan_ok, predicted = await self._fan_out(request, budget, features, start)
        ok = [(run.expert, out) for run, out in outputs]
        weights = self.planner.gate_weights(request.task, features, [e for e, _ in ok])
        parts = []
        for (expert, out), w in zip(ok, weights, strict=True):
            runs[expert.id].weight = float(w)
            parts.append(ExpertOutput(expert.id, float(w), out))
        fused = fuse(
            request.task,
            parts,
            image_size=request.inputs.image_size,
            class_names=ok[0][0].class_names,
        )
        return self.finish(request, list(runs.values()), fused, budget, start, plan_ok, predicted)

    def _default_budget(self) -> Budget:
        b = self.settings.default_budget
        return Budget(b.latency_ms, b.energy_mj)

    async def _fan_out(
        self, request: PerceiveInput, budget: Budget, features: np.ndarray | None, start: float
    ) -> tuple[dict[str, Run], list[tuple[Run, dict[str, np.ndarray]]], bool, tuple[float, float]]:
        task, inputs = request.task, request.inputs
        plan = self.planner.plan(task, features, budget)
        plan_ok = plan.feasible
        tm = self.planner.task_model(task)
        k = tm.max_experts or self.settings.max_experts or 1 << 30
        runs: dict[str, Run] = {}
        outputs: list[tuple[Run, dict[str, np.ndarray]]] = []
        running: dict[asyncio.Task[ExpertCall], tuple[Expert, float]] = {}

        def launch(experts: tuple[Expert, ...], capped: bool) -> None:
            reserve = 0.0
            if capped and budget.latency_ms > 0:
                reserve = self._reserve_ms(task, {*runs, *(e.id for e in experts)})
            for e in experts:
                now = time.monotonic()
                deadline = self._deadline(e, now, start, budget, capped, request.deadline, reserve)
                runs[e.id] = Run(e)
                running[asyncio.create_task(self.call(e, inputs, deadline - now))] = (e, now)
                if self.metrics is not None:
                    self.metrics.selections.labels(task=task, expert=e.id).inc()

        launch(plan.experts, plan_ok)
        try:
            while running:
                done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for t in done:
                    expert, _ = running.pop(t)
                    outcome = t.result()
                    run = runs[expert.id]
                    self.record(expert, run, outcome)
                    if outcome.result is not None:
                        outputs.append((run, outcome.result.outputs))
                        continue
                    log.info("expert %s dropped (%s): %s", expert.id, outcome.status, outcome.error)
                    launch(
                        self._reselect(task, features, budget, start, runs, running, k - len(outputs)), True
                    )
                if not running and not outputs:
                    if request.deadline is not None and time.monotonic() >= request.deadline:
                        raise DeadlineExceeded(
                            f"task {task!r}: the caller's deadline passed before any expert answered"
                        )
                    rest = self.planner.candidates(task, exclude=set(runs))
                    if not rest:
                        errors = "; ".join(f"{r.expert.id}: {r.status} {r.error}" for r in runs.values())
                        raise Unavailable(f"task {task!r}: every expert failed ({errors})")
                    plan_ok = False  # last resort: the cheapest untried expert, whatever the budget
                    launch((min(rest, key=lambda e: (e.energy_mj, e.latency_ms, e.id)),), False)
        finally:
            for t in running:
                t.cancel()
        return runs, outputs, plan_ok, (plan.latency_ms, plan.energy_mj)

    def _reselect(
        self,
        task: str,
        features: np.ndarray | None,
        budget: Budget,
        start: float,
        runs: Mapping[str, Run],
        running: Mapping[asyncio.Task[ExpertCall], tuple[Expert, float]],
        limit: int,
    ) -> tuple[Expert, ...]:
        """Replacements among the untried experts that fit what is left of the budget."""
        limit -= len(running)
        if limit <= 0:
            return ()
        now = time.monotonic()
        elapsed_ms = (now - start) * 1e3
        spent = sum(r.energy_mj for r in runs.values()) + sum(e.energy_mj for e, _ in running.values())
        lat_left = budget.latency_ms - elapsed_ms if budget.latency_ms > 0 else 0.0
        energy_left = budget.energy_mj - spent if budget.energy_mj > 0 else 0.0
        if (budget.latency_ms > 0 and lat_left <= 0) or (budget.energy_mj > 0 and energy_left <= 0):
            return ()
        busy: dict[str, float] = {}
        for e, t0 in running.values():
            left = max(e.latency_ms - (now - t0) * 1e3, 0.0)
            busy[e.device] = busy.get(e.device, 0.0) + left
        plan = self.planner.plan(
            task,
            features,
            Budget(lat_left, energy_left),
            exclude=set(runs),
            busy=busy,
            limit=limit,
            fallback=False,
        )
        return plan.experts

    def finish(
        self,
        request: PerceiveInput,
        runs: list[Run],
        fused: Fused,
        budget: Budget,
        start: float,
        plan_ok: bool,
        predicted: tuple[float, float],
    ) -> Perception:
        """Measured totals, budget verdict and metrics of a finished request."""
        measured_ms = (time.monotonic() - start) * 1e3
        energy = sum(r.energy_mj for r in runs if r.status != "error")
        contributing = [r for r in runs if r.status == "ok"]
        energy_measured = bool(contributing) and all(r.energy_measured for r in runs if r.status != "error")
        late = budget.latency_ms > 0 and measured_ms > budget.latency_ms
        over = budget.energy_mj > 0 and energy > budget.energy_mj * (1 + 1e-9)
        if self.metrics is not None:
            for kind, flag in (("infeasible", not plan_ok), ("latency", late), ("energy", over)):
                if flag:
                    self.metrics.budget_violations.labels(task=request.task, kind=kind).inc()
        return Perception(
            request_id=request.request_id or uuid.uuid4().hex[:16],
            task=request.task,
            runs=runs,
            fused=fused,
            predicted_latency_ms=predicted[0],
            predicted_energy_mj=predicted[1],
            measured_latency_ms=measured_ms,
            measured_energy_mj=energy,
            energy_measured=energy_measured,
            budget_met=plan_ok and not late and not over,
        )


def predicted_cost(coordinator: Coordinator, experts: list[Expert]) -> tuple[float, float]:
    """Predicted (latency, energy) of a set under the live profiles."""
    return set_cost(experts, coordinator.settings.overhead_ms)
