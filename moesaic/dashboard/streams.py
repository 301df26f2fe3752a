"""One task on one sensor as the dashboard follows it: the latest decision and its history.

A result JSON (:mod:`moesaic.ingest.results`) becomes a *decision* (the experts chosen, their
gate weights, measured and predicted cost, the budget and, when it was missed, why) and one
chart *sample*. Fields are read with ``.get`` and checked, so a result from an older or newer
bridge still shows what it has.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["Stream", "TaskKey", "decision", "miss_reason", "number", "text"]

_MAX_SAMPLES = 6000
_MAX_EXPERTS = 32


class TaskKey(NamedTuple):
    sensor: str
    task: str


def text(value: object, limit: int = 200) -> str:
    """``value`` as a string of at most ``limit`` characters ("" for None and containers)."""
    if value is None or isinstance(value, dict | list | tuple):
        return ""
    return str(value)[:limit]


def number(value: object) -> float | None:
    """A finite float, or None (so the JSON sent to pages never holds NaN or Infinity)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    result = float(value)
    return result if math.isfinite(result) else None


def _mapping(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _output_summary(output: object) -> dict[str, Any]:
    """A few words of the fused output: how many detections, which classes, a grid's size."""
    if not isinstance(output, dict):
        return {"type": "none"}
    kind = text(output.get("type"), 20)
    if kind == "detections":
        items = output.get("items")
        items = items if isinstance(items, list) else []
        classes: dict[str, int] = {}
        for item in items:
            if isinstance(item, dict):
                name = text(item.get("class_name"), 60) or text(item.get("class_id"), 20)
                classes[name] = classes.get(name, 0) + 1
        top = sorted(classes.items(), key=lambda kv: -kv[1])[:8]
        return {"type": kind, "count": len(items), "classes": dict(top)}
    if kind in ("segmentation", "grid"):
        shape = output.get("shape")
        dims = [int(d) for d in shape if isinstance(d, int)] if isinstance(shape, list) else []
        summary: dict[str, Any] = {"type": kind, "shape": dims[:4]}
        pixels = output.get("class_pixels")
        if isinstance(pixels, dict):
            summary["class_pixels"] = {
                text(k, 20): int(v) for k, v in list(pixels.items())[:32] if isinstance(v, int)
            }
        return summary
    if kind == "text":
        return {"type": kind, "text": text(output.get("text"), 300)}
    return {"type": kind or "none"}


def miss_reason(body: dict[str, Any]) -> tuple[str, bool]:
    """Why a result missed its budget: the result's ``budget_reason``, else one derived from its
    figures (``derived`` True). ``("", False)`` when the budget was met."""
    if body.get("budget_met") is not False:
        return "", False
    given = text(body.get("budget_reason"), 200)
    if given:
        return given, False
    budget = _mapping(body.get("budget"))
    lb, eb = number(budget.get("latency_ms")) or 0.0, number(budget.get("energy_mj")) or 0.0
    lat, energy = number(body.get("latency_ms")), number(body.get("energy_mj"))
    plat, penergy = number(body.get("predicted_latency_ms")), number(body.get("predicted_energy_mj"))
    if lb and lat is not None and lat > lb:
        return "deadline_missed", True
    if eb and energy is not None and energy > eb:
        return "energy_over", True
    if (lb and plat is not None and plat > lb) or (eb and penergy is not None and penergy > eb):
        return "no_feasible_set", True
    return "unknown", True


def decision(body: dict[str, Any], *, received: float) -> dict[str, Any]:
    """The decision a result JSON records, checked field by field."""
    experts = []
    raw = body.get("experts")
    for e in raw[:_MAX_EXPERTS] if isinstance(raw, list) else []:
        if not isinstance(e, dict):
            continue
        experts.append(
            {
                "id": text(e.get("id"), 200),
                "node": text(e.get("node"), 128),
                "model": text(e.get("model"), 128),
                "weight": number(e.get("weight")),
                "latency_ms": number(e.get("latency_ms")),
                "energy_mj": number(e.get("energy_mj")),
                "energy_measured": e.get("energy_measured") is True,
                "status": text(e.get("status"), 40),
                "error": text(e.get("error"), 300),
            }
        )
    budget = _mapping(body.get("budget"))
    reason, derived = miss_reason(body)
    frame_id = body.get("frame_id")
    return {
        "frame_id": frame_id if isinstance(frame_id, int) else None,
        "timestamp": number(body.get("timestamp")),
        "received": received,
        "experts": experts,
        "latency_ms": number(body.get("latency_ms")),
        "predicted_latency_ms": number(body.get("predicted_latency_ms")),
        "energy_mj": number(body.get("energy_mj")),
        "predicted_energy_mj": number(body.get("predicted_energy_mj")),
        "energy_source": text(body.get("energy_source"), 40),
        "budget": {
            "latency_ms": number(budget.get("latency_ms")) or 0.0,
            "energy_mj": number(budget.get("energy_mj")) or 0.0,
        },
        "budget_met": body.get("budget_met") is True,
        "budget_reason": reason,
        "reason_derived": derived,
        "feasible": body.get("feasible") if isinstance(body.get("feasible"), bool) else None,
        "bridge_ms": number(body.get("bridge_ms")),
        "output": _output_summary(body.get("output")),
    }


@dataclass
class Stream:
    """Results of one task on one sensor: counts, the latest decision, the chart samples."""

    sensor: str
    task: str
    kind: str = ""
    results: int = 0
    met: int = 0
    latest: dict[str, Any] | None = None
    last_miss: dict[str, Any] | None = None
    last_error: dict[str, Any] | None = None
    samples: deque[list[Any]] = field(default_factory=lambda: deque(maxlen=_MAX_SAMPLES))
    """``[seq, t, latency, predicted latency, latency budget, energy, predicted energy,
    energy budget, met]`` per result; budgets 0 = unbounded; absent figures are null."""
    _sent_seq: int = 0

    @property
    def key(self) -> TaskKey:
        return TaskKey(self.sensor, self.task)

    def add(self, body: dict[str, Any], *, now: float, seq: int, history_s: float) -> None:
        self.kind = text(body.get("kind"), 20) or self.kind
        d = decision(body, received=now)
        self.results += 1
        self.met += d["budget_met"]
        self.latest = d
        if not d["budget_met"]:
            self.last_miss = {"t": now, "frame_id": d["frame_id"], "reason": d["budget_reason"]}
        b = d["budget"]
        self.samples.append(
            [
                seq,
                now,
                d["latency_ms"],
                d["predicted_latency_ms"],
                b["latency_ms"],
                d["energy_mj"],
                d["predicted_energy_mj"],
                b["energy_mj"],
                1 if d["budget_met"] else 0,
            ]
        )
        self.trim(now, history_s)

    def trim(self, now: float, history_s: float) -> None:
        """Forget samples older than ``history_s``."""
        while self.samples and self.samples[0][1] < now - history_s:
            self.samples.popleft()

    def to_json(self, *, samples_after: int) -> dict[str, Any]:
        return {
            "sensor": self.sensor,
            "task": self.task,
            "kind": self.kind,
            "results": self.results,
            "met": self.met,
            "latest": self.latest,
            "last_miss": self.last_miss,
            "last_error": self.last_error,
            "samples": [s for s in self.samples if s[0] > samples_after],
        }

    def drain_json(self) -> dict[str, Any]:
        """The stream with only the samples not sent in an earlier drain."""
        out = self.to_json(samples_after=self._sent_seq)
        if self.samples:
            self._sent_seq = self.samples[-1][0]
        return out
