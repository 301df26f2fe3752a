"""The Perceive pipeline, read top-down: validate -> features -> select -> dispatch -> fuse -> reply.

Every entry (the Perceive and PerceiveStream handlers, the MQTT bridge) calls
:meth:`Pipeline.perceive`. Each step is a small method that reads and extends one
:class:`RequestState`; selection (gate weights + MoE² fine level) is the pure
:class:`~moesaic.coordinator.planner.Planner` over the experts the registry offers now, with
their load-aware predicted costs. Sliced detection (option ``slice``) replaces dispatch and
fuse with its tile fan-out (:mod:`moesaic.coordinator.sliced`).

The reply's budget verdict: ``budget_met`` is false with a ``budget_reason`` of
``no_feasible_set`` (nothing was predicted to fit; the cheapest expert ran, or, under the
task's ``shed`` policy, the request is refused with RESOURCE_EXHAUSTED), ``expert_failed``
(the planned experts failed; a replacement ran outside the budget), ``deadline_missed`` or
``energy_over`` (measured over the budget).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from moesaic.budget import UNBOUNDED, Budget
from moesaic.coordinator.calls import Caller, Run
from moesaic.coordinator.config import CoordinatorSettings
from moesaic.coordinator.dispatch import Dispatch
from moesaic.coordinator.features import features_of
from moesaic.coordinator.fusion import FUSED_TASKS, ExpertOutput, Fused, fuse
from moesaic.coordinator.inputs import RequestInputs
from moesaic.coordinator.planner import Plan, Planner, cheapest
from moesaic.coordinator.registry import Expert, Registry
from moesaic.coordinator.sliced import perceive_sliced
from moesaic.errors import InvalidInput, ResourceExhausted, Unavailable, quote
from moesaic.metrics import Metrics

__all__ = ["PerceiveInput", "Perception", "Pipeline", "RequestState"]


@dataclass(frozen=True)
class PerceiveInput:
    task: str
    inputs: RequestInputs
    budget: Budget = UNBOUNDED
    request_id: str = ""
    options: Mapping[str, str] = field(default_factory=dict)
    deadline: float | None = None
    """Absolute ``time.monotonic()`` by which the caller gives up (its gRPC deadline)."""


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
    budget: Budget = UNBOUNDED
    budget_reason: str = ""
    feasible: bool = True
    cheapest_latency_ms: float = 0.0
    cheapest_energy_mj: float = 0.0


@dataclass
class RequestState:
    """One request on its way through the pipeline."""

    request: PerceiveInput
    budget: Budget
    """The budget applied: the request's own, else the fleet's default."""
    start: float
    deadline: float
    """Absolute monotonic time the request gives up: the caller's, else ``default_deadline_ms``."""
    max_experts: int
    shed: bool
    sensor: str = ""
    features: np.ndarray | None = None
    experts: list[Expert] = field(default_factory=list)
    plan: Plan | None = None
    cheapest: tuple[float, float] = (0.0, 0.0)
    runs: list[Run] = field(default_factory=list)
    outputs: list[tuple[Run, dict[str, np.ndarray]]] = field(default_factory=list)
    fallback: str = ""
    """Why experts ran outside the budget: "no_feasible_set" or "expert_failed"."""


class Pipeline:
    def __init__(
        self,
        settings: CoordinatorSettings,
        registry: Registry,
        planner: Planner,
        *,
        metrics: Metrics | None = None,
        shed_tasks: frozenset[str] = frozenset(),
    ) -> None:
        self.settings = settings
        self.registry = registry
        self.planner = planner
        self.metrics = metrics
        self.caller = Caller(registry, metrics)
        self.shed_tasks = shed_tasks

    async def perceive(self, request: PerceiveInput) -> Perception:
        """Run one request to a fused result; raises InvalidInput / Unavailable / DeadlineExceeded
        / ResourceExhausted (no feasible set under the ``shed`` policy)."""
        state = self.validate(request)
        state.features = self.features(state)
        if request.task == "detection" and request.options.get("slice"):  # plans its own tiles
            fused = await perceive_sliced(state, self.registry, self.planner, self.caller, self.infeasible)
        else:
            self.select(state)
            await Dispatch(state, self.registry, self.planner, self.caller).run()
            fused = self.fuse(state)
        return self.reply(state, fused)

    # -- the steps, in order -----------------------------------------------------------
    def validate(self, request: PerceiveInput) -> RequestState:
        """Check the task and that it has experts; fix the budget and the deadline."""
        if request.task not in FUSED_TASKS:
            raise InvalidInput(f"task: {request.task!r} is not one of {list(FUSED_TASKS)}")
        s = self.settings
        start = time.monotonic()
        budget = request.budget if request.budget.bounded else s.default_budget
        deadline = start + s.default_deadline_ms / 1e3
        if request.deadline is not None:
            deadline = min(deadline, request.deadline - 0.005)
        tm = self.planner.task_model(request.task)
        state = RequestState(
            request,
            budget,
            start,
            deadline,
            max_experts=tm.max_experts or s.max_experts or 1 << 30,
            shed=request.task in self.shed_tasks,
            sensor=str(request.inputs.parameters.get("sensor_id", "")),
        )
        offer = self.registry.experts(request.task, sensor=state.sensor, now=start)
        state.experts = _only(self.planner.candidates(request.task, offer), request)
        if not state.experts:
            raise Unavailable(f"task {request.task!r}: no expert is up", reason="no_expert")
        return state

    def features(self, state: RequestState) -> np.ndarray | None:
        """The gate's request features (none when the task has no gate)."""
        tm = self.planner.task_model(state.request.task)
        if tm.gate is None:
            return None
        return features_of(tm.input_kind, state.request.inputs.tensors)

    def select(self, state: RequestState) -> None:
        """Gate + MoE² fine level over the experts on offer, with their predicted costs now."""
        task = state.request.task
        state.plan = self.planner.plan(
            task, state.experts, state.features, state.budget, epoch=self.registry.epoch
        )
        low = cheapest(state.experts)
        state.cheapest = (low.latency_ms + self.settings.overhead_ms, low.energy_mj)
        if not state.plan.feasible:
            self.infeasible(state)

    def infeasible(self, state: RequestState) -> None:
        """No expert set fits: shed the request (task policy ``shed``) or run outside the budget."""
        task = state.request.task
        if state.shed:
            if self.metrics is not None:
                self.metrics.requests_shed.labels(task=task).inc()
            raise ResourceExhausted(
                f"task {task!r}: no expert set fits the budget ({_budget(state.budget)}); the "
                f"cheapest needs {state.cheapest[0]:.0f} ms / {state.cheapest[1]:.0f} mJ",
                reason="no_feasible_set",
            )
        state.fallback = "no_feasible_set"

    def fuse(self, state: RequestState) -> Fused:
        """Weighted fusion of the experts that answered (gate weights renormalised over them)."""
        ok = [(run.expert, out) for run, out in state.outputs]
        weights = self.planner.gate_weights(state.request.task, state.features, [e for e, _ in ok])
        parts = []
        for (run, out), w in zip(state.outputs, weights, strict=True):
            run.weight = float(w)
            parts.append(ExpertOutput(run.expert.id, float(w), out))
        return fuse(
            state.request.task,
            parts,
            image_size=state.request.inputs.image_size,
            class_names=ok[0][0].class_names,
        )

    def reply(self, state: RequestState, fused: Fused) -> Perception:
        """Measured totals, the budget verdict with its reason, and metrics."""
        request, budget, plan = state.request, state.budget, state.plan
        assert plan is not None
        measured_ms = (time.monotonic() - state.start) * 1e3
        spent = [r for r in state.runs if r.status not in ("error", "cancelled")]
        energy = sum(r.energy_mj for r in spent)
        contributing = [r for r in state.runs if r.status == "ok"]
        energy_measured = bool(contributing) and all(r.energy_measured for r in spent)
        late = budget.latency_ms > 0 and measured_ms > budget.latency_ms
        over = budget.energy_mj > 0 and energy > budget.energy_mj * (1 + 1e-9)
        reason = state.fallback or ("deadline_missed" if late else "energy_over" if over else "")
        if self.metrics is not None:
            if reason:
                self.metrics.budget_violations.labels(task=request.task, reason=reason).inc()
            if plan.feasible and not state.fallback:
                error = self.metrics.prediction_error
                error.labels(task=request.task, kind="latency").observe(
                    measured_ms / max(plan.latency_ms, 1e-3)
                )
                if plan.energy_mj > 0:
                    error.labels(task=request.task, kind="energy").observe(energy / plan.energy_mj)
        return Perception(
            request_id=request.request_id or uuid.uuid4().hex[:16],
            task=request.task,
            runs=state.runs,
            fused=fused,
            predicted_latency_ms=plan.latency_ms,
            predicted_energy_mj=plan.energy_mj,
            measured_latency_ms=measured_ms,
            measured_energy_mj=energy,
            energy_measured=energy_measured,
            budget_met=not reason,
            budget=budget,
            budget_reason=reason,
            feasible=plan.feasible,
            cheapest_latency_ms=state.cheapest[0],
            cheapest_energy_mj=state.cheapest[1],
        )


def _only(experts: list[Expert], request: PerceiveInput) -> list[Expert]:
    """``experts`` restricted by the request's ``experts`` option (InvalidInput naming an unknown id)."""
    wanted = [e.strip() for e in request.options.get("experts", "").split(",") if e.strip()]
    if not wanted:
        return experts
    known = {e.id for e in experts}
    unknown = [e for e in wanted if e not in known]
    if unknown:
        raise InvalidInput(
            f"options.experts: {quote(unknown[0], 64)} is not an expert of task {request.task!r} that is "
            f"up (up: {sorted(known)})",
            reason="bad_option",
        )
    return [e for e in experts if e.id in wanted]


def _budget(budget: Budget) -> str:
    parts = [
        f"{budget.latency_ms:g} ms" if budget.latency_ms > 0 else "",
        f"{budget.energy_mj:g} mJ" if budget.energy_mj > 0 else "",
    ]
    return " / ".join(p for p in parts if p) or "unbounded"
