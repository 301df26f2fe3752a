"""Dispatch: run a plan's experts in parallel, each under its deadline, and fail over.

Each call's deadline is the earliest of: the request's budget end (less ``overhead_ms``), the
expert's hang deadline (``deadline_slack`` x its predicted latency + ``deadline_margin_ms``, so a
frozen node is given up in milliseconds, not at the caller's deadline) and the request's own
deadline (the caller's, else ``default_deadline_ms``). An expert that errors or misses its
deadline is dropped and replaced by the best experts not yet tried that fit what is left of
the budget. When nothing has answered and nothing runs, the cheapest untried expert runs
outside the budget (reason ``expert_failed``), else an expert that was only slow runs again
with a longer deadline; when every expert failed, :class:`Unavailable`.
Calls still running when the request ends are cancelled (the node drops them unrun).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from moesaic.budget import Budget
from moesaic.coordinator.calls import Caller, ExpertCall, Run
from moesaic.coordinator.planner import Planner, cheapest
from moesaic.coordinator.registry import Expert, Registry
from moesaic.errors import DeadlineExceeded, Unavailable

if TYPE_CHECKING:
    from moesaic.coordinator.pipeline import RequestState

__all__ = ["MAX_RETRIES", "Dispatch"]

MAX_RETRIES = 3

log = logging.getLogger(__name__)


class Dispatch:
    """One request's expert calls; :meth:`run` fills ``state.runs`` and ``state.outputs``."""

    def __init__(self, state: RequestState, registry: Registry, planner: Planner, caller: Caller) -> None:
        self.state = state
        self.registry = registry
        self.planner = planner
        self.caller = caller
        self.settings = planner.settings
        self.running: dict[asyncio.Task[ExpertCall], tuple[Run, bool]] = {}
        self.failed_replicas: set[str] = set()
        self.retries = 0

    async def run(self) -> None:
        state = self.state
        assert state.plan is not None
        self.launch(state.plan.experts, within_budget=state.plan.feasible)
        try:
            while self.running:
                done, _ = await asyncio.wait(self.running, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    run, _ = self.running.pop(task)
                    outcome = task.result()
                    self.caller.record(run, outcome)
                    if outcome.result is not None:
                        state.outputs.append((run, outcome.result.outputs))
                        self.registry.pin(run.expert, state.sensor)
                        continue
                    log.info(
                        "expert %s dropped (%s): %s", run.expert.replica.id, outcome.status, outcome.error
                    )
                    self.failed_replicas.add(run.expert.replica.id)
                    self.launch(self.replacements(), within_budget=True)
                if not self.running and not state.outputs:
                    self.last_resort()
        finally:
            for task, (run, _) in self.running.items():
                task.cancel()
                run.status, run.error = "cancelled", "the request ended first"

    def launch(self, experts: tuple[Expert, ...], *, within_budget: bool) -> None:
        state = self.state
        for expert in experts:
            now = time.monotonic()
            run = Run(expert)
            state.runs.append(run)
            deadline = self.deadline(expert, now, within_budget)
            task = asyncio.create_task(self.caller.call(expert, state.request.inputs, deadline))
            self.running[task] = (run, within_budget)
            if self.caller.metrics is not None:
                self.caller.metrics.selections.labels(task=state.request.task, expert=expert.id).inc()

    def deadline(self, expert: Expert, now: float, within_budget: bool) -> float:
        """When to stop waiting for ``expert`` (absolute ``time.monotonic()``)."""
        s, state = self.settings, self.state
        hang = now + (s.deadline_slack * expert.latency_ms + s.deadline_margin_ms) / 1e3
        deadline = min(hang, now + s.expert_timeout_ms / 1e3, state.deadline)
        if within_budget and state.budget.latency_ms > 0:
            deadline = min(deadline, state.start + (state.budget.latency_ms - s.overhead_ms) / 1e3)
        return max(deadline, now + 0.001)

    def untried(self) -> list[Expert]:
        """Experts on offer now that this request has not run (or only on a failed replica)."""
        state = self.state
        taken = {r.expert.id for r in state.runs if r.expert.replica.id not in self.failed_replicas}
        offer = self.registry.experts(state.request.task, avoid=self.failed_replicas, sensor=state.sensor)
        return [e for e in self.planner.candidates(state.request.task, offer) if e.id not in taken]

    def replacements(self) -> tuple[Expert, ...]:
        """The best untried experts that fit what is left of the budget."""
        state = self.state
        limit = state.max_experts - len(state.outputs) - len(self.running)
        if limit <= 0:
            return ()
        now = time.monotonic()
        budget = state.budget
        spent = sum(r.energy_mj for r in state.runs if r.status != "running") + sum(
            r.expert.energy_mj for r, _ in self.running.values()
        )
        lat_left = budget.latency_ms - (now - state.start) * 1e3 if budget.latency_ms > 0 else 0.0
        energy_left = budget.energy_mj - spent if budget.energy_mj > 0 else 0.0
        if (budget.latency_ms > 0 and lat_left <= 0) or (budget.energy_mj > 0 and energy_left <= 0):
            return ()
        busy: dict[str, float] = {}
        for run, _ in self.running.values():
            busy[run.expert.device] = busy.get(run.expert.device, 0.0) + run.expert.latency_ms
        plan = self.planner.plan(
            state.request.task,
            self.untried(),
            state.features,
            Budget(latency_ms=lat_left, energy_mj=energy_left),
            epoch=self.registry.epoch,
            busy=busy,
            limit=limit,
            fallback=False,
        )
        return plan.experts

    def last_resort(self) -> None:
        """Nothing answered and nothing runs: the cheapest untried expert, outside the budget."""
        state = self.state
        task = state.request.task
        if time.monotonic() >= state.deadline:
            raise DeadlineExceeded(f"task {task!r}: the request's deadline passed before any expert answered")
        rest = self.untried() or self.slow_retry()
        if not rest:
            errors = "; ".join(f"{r.expert.replica.id}: {r.status} {r.error}" for r in state.runs)
            raise Unavailable(f"task {task!r}: every expert failed ({errors})", reason="experts_failed")
        state.fallback = state.fallback or "expert_failed"
        self.launch((cheapest(rest),), within_budget=False)

    def slow_retry(self) -> list[Expert]:
        """Every expert was tried and some only missed their deadline (slow, not broken): retry
        those, at most ``MAX_RETRIES`` times a request. Each miss raised the replica's predicted
        latency to the time it was waited for, so each retry waits ``deadline_slack`` x longer."""
        if self.retries >= MAX_RETRIES:
            return []
        self.retries += 1
        slow = {r.expert.replica.id: r.expert.replica for r in self.state.runs if r.status == "deadline"}
        return [self.registry.offer(replica) for replica in slow.values()]
