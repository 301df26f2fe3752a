"""What every replayed frame got, per task, and the figures of ``summary.json``.

A :class:`Ledger` learns each frame the demo publishes and each result and error message
the bridge publishes back. Every published frame ends, per task of its sensor, in exactly
one of three states: a **result** (its first result message), an **error** (an error
message naming the frame and the task, or the frame alone), or **dropped** (no answer: the
bridge dropped it from its latest-frame queue, it never reached the bridge, or its answer
never came). So ``results + errors + dropped == frames`` per task.

Of the results, **feasible** ones had a budget that admitted at least one expert set by the
coordinator's own prediction (the result's ``feasible``; ``budget_met`` in results written
before that field existed), and **within budget** ones measured a latency and an energy
within the budget (0 = unbounded).

>>> ledger = Ledger({"cam": ("detection",)})
>>> ledger.published("cam", 1); ledger.published("cam", 2)
>>> ledger.result({"sensor": "cam", "task": "detection", "frame_id": 1, "latency_ms": 80.0,
...                "energy_mj": 5.0, "budget": {"latency_ms": 100.0, "energy_mj": 0.0},
...                "feasible": True, "experts": [{"id": "a/m", "status": "ok"}]})
>>> figures = task_summary(ledger.tasks["detection"], gate="trained")
>>> figures["results"], figures["dropped"], figures["within_budget_of_feasible"]
(1, 1, 1.0)
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Ledger", "Outcome", "TaskLedger", "summarise", "task_summary"]

_ENERGY_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Outcome:
    """What one result message said, reduced to what the summary counts."""

    latency_ms: float
    energy_mj: float
    energy_measured: bool
    feasible: bool
    within_budget: bool
    reason: str
    experts: tuple[str, ...]
    budget: tuple[float, float] = (0.0, 0.0)
    """(latency ms, energy mJ); 0 = unbounded."""
    end_to_end_ms: float | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any], end_to_end_ms: float | None = None) -> Outcome:
        """From a result's JSON (see :mod:`moesaic.ingest.results`)."""
        budget = body.get("budget") or {}
        latency_budget = float(budget.get("latency_ms") or 0.0)
        energy_budget = float(budget.get("energy_mj") or 0.0)
        latency = float(body.get("latency_ms") or 0.0)
        energy = float(body.get("energy_mj") or 0.0)
        within = (latency_budget <= 0 or latency <= latency_budget) and (
            energy_budget <= 0 or energy <= energy_budget * (1 + _ENERGY_TOLERANCE)
        )
        feasible = body.get("feasible")
        return cls(
            latency_ms=latency,
            energy_mj=energy,
            energy_measured=body.get("energy_source") == "measured",
            feasible=bool(body.get("budget_met")) if feasible is None else bool(feasible),
            within_budget=within,
            reason=str(body.get("budget_reason") or ""),
            experts=tuple(
                str(e["id"]) for e in body.get("experts") or () if isinstance(e, dict) and "id" in e
            ),
            budget=(latency_budget, energy_budget),
            end_to_end_ms=end_to_end_ms,
        )


@dataclass
class TaskLedger:
    """One task's frames and the answer each got."""

    task: str
    frames: set[int] = field(default_factory=set)
    results: dict[int, Outcome] = field(default_factory=dict)
    errors: dict[int, str] = field(default_factory=dict)

    def counts(self) -> tuple[int, int, int, int]:
        """(frames, results, errors, dropped) of the published frames."""
        results = sum(1 for f in self.results if f in self.frames)
        errors = sum(1 for f in self.errors if f in self.frames and f not in self.results)
        return len(self.frames), results, errors, len(self.frames) - results - errors


class Ledger:
    """Frames published per sensor, and the results and errors they got per task.

    ``streams`` maps each sensor id to the tasks the bridge runs on its frames.
    """

    def __init__(self, streams: Mapping[str, Sequence[str]]) -> None:
        self.streams = {sensor: tuple(tasks) for sensor, tasks in streams.items()}
        self.tasks = {task: TaskLedger(task) for tasks in self.streams.values() for task in tasks}
        self.unattributed_errors: Counter[str] = Counter()
        """Error messages that name no published frame (e.g. an unreadable payload)."""
        self.error_reasons: dict[str, Counter[str]] = {task: Counter() for task in self.tasks}
        self.started = time.monotonic()
        self._sent_at: dict[tuple[str, int], float] = {}

    def published(self, sensor: str, frame_id: int) -> None:
        self._sent_at[(sensor, frame_id)] = time.monotonic()
        for task in self.streams.get(sensor, ()):
            self.tasks[task].frames.add(frame_id)

    @property
    def frames(self) -> int:
        """Frames published, over all sensors."""
        return len(self._sent_at)

    def result(self, body: Mapping[str, Any]) -> bool:
        """Fold in one result message; False when it names no published frame or repeats one."""
        sensor, task, frame_id = str(body.get("sensor")), str(body.get("task")), int(body.get("frame_id", -1))
        ledger = self.tasks.get(task)
        if ledger is None or task not in self.streams.get(sensor, ()) or frame_id not in ledger.frames:
            return False
        if frame_id in ledger.results:
            return False  # a redelivery (QoS 1): the first one counts
        sent = self._sent_at.get((sensor, frame_id))
        ledger.results[frame_id] = Outcome.of(body, (time.monotonic() - sent) * 1e3 if sent else None)
        return True

    def error(self, body: Mapping[str, Any]) -> None:
        """Fold in one error message: for its task, or every task of its sensor when it names none."""
        reason = str(body.get("reason") or "unknown")
        sensor, frame_id = str(body.get("sensor")), body.get("frame_id")
        tasks = [str(body["task"])] if body.get("task") else list(self.streams.get(sensor, ()))
        hit = False
        for task in tasks:
            ledger = self.tasks.get(task)
            if ledger is not None and isinstance(frame_id, int) and frame_id in ledger.frames:
                ledger.errors.setdefault(frame_id, reason)
                self.error_reasons[task][reason] += 1
                hit = True
        if not hit:
            self.unattributed_errors[reason] += 1


def _percentile(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 2) if values else None


def _mean(values: Sequence[float]) -> float | None:
    return round(float(np.mean(values)), 2) if len(values) else None


def task_summary(ledger: TaskLedger, *, gate: str) -> dict[str, Any]:
    """The figures of one task in ``summary.json`` (see the module docstring)."""
    frames, results, errors, dropped = ledger.counts()
    outcomes = [o for f, o in ledger.results.items() if f in ledger.frames]
    feasible = [o for o in outcomes if o.feasible]
    within = sum(o.within_budget for o in outcomes)
    within_feasible = sum(o.within_budget for o in feasible)
    latency = [o.latency_ms for o in outcomes]
    measured = sum(o.energy_measured for o in outcomes)
    source = None if not outcomes else ("measured" if measured == len(outcomes) else "estimate")
    if outcomes and 0 < measured < len(outcomes):
        source = "mixed"
    selections = Counter(e for o in outcomes for e in set(o.experts))  # results that selected e
    end_to_end = [o.end_to_end_ms for o in outcomes if o.end_to_end_ms is not None]
    return {
        "frames": frames,
        "results": results,
        "errors": errors,
        "dropped": dropped,
        "feasible": len(feasible),
        "within_budget": within,
        "within_budget_of_feasible": round(within_feasible / len(feasible), 4) if feasible else None,
        "latency_ms": {
            "mean": _mean(latency),
            "p50": _percentile(latency, 50),
            "p99": _percentile(latency, 99),
        },
        "end_to_end_ms": {"mean": _mean(end_to_end), "p99": _percentile(end_to_end, 99)},
        "energy_mj": {"mean": _mean([o.energy_mj for o in outcomes]), "source": source},
        "gate": gate,
        "selections": dict(sorted(selections.items(), key=lambda kv: (-kv[1], kv[0]))),
        "budget_reasons": dict(Counter(o.reason for o in outcomes if o.reason)),
        "budgets": _by_budget(outcomes),
    }


def _by_budget(outcomes: list[Outcome]) -> dict[str, dict[str, Any]]:
    """Per budget (``"400 ms, 0 mJ"``): results, feasible, within budget, p50 latency, selections."""
    out: dict[str, dict[str, Any]] = {}
    for budget in sorted({o.budget for o in outcomes}):
        these = [o for o in outcomes if o.budget == budget]
        out[f"{budget[0]:g} ms, {budget[1]:g} mJ"] = {
            "results": len(these),
            "feasible": sum(o.feasible for o in these),
            "within_budget": sum(o.within_budget for o in these),
            "latency_ms_p50": _percentile([o.latency_ms for o in these], 50),
            "energy_mj_p50": _percentile([o.energy_mj for o in these], 50),
            "selections": dict(Counter(e for o in these for e in set(o.experts)).most_common()),
        }
    return out


def summarise(
    ledger: Ledger,
    *,
    duration_s: float,
    gates: Mapping[str, str],
    bridge: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``summary.json``: the run's duration and each task's figures (``gates``: task -> trained|prior).

    ``bridge`` (the bridge's own counters: frames dropped by reason, frames missing) is kept
    beside the tasks as ``bridge``; it explains ``dropped`` but does not enter it.
    """
    tasks = {
        task: task_summary(ledger.tasks[task], gate=gates.get(task, "prior"))
        | {"error_reasons": dict(ledger.error_reasons[task])}
        for task in sorted(ledger.tasks)
    }
    out: dict[str, Any] = {"duration_s": round(duration_s, 2), "tasks": tasks}
    out["bridge"] = {**(bridge or {}), "unattributed_errors": dict(ledger.unattributed_errors)}
    return out
