"""The offline selection problem file read by ``moesaic select``.

Format (JSON)::

    {"overhead_ms": 2.0,
     "experts": [{"id": "jetson/yolo-n", "device": "jetson", "latency_ms": 18, "energy_mj": 90}, ...],
     "samples": [{"label": 1, "gate": [0.2, 0.8], "probs": [[0.3, 0.7], [0.1, 0.9]]}, ...],
     "budget": {"latency_ms": 40, "energy_mj": 150}}

``gate`` holds one weight per expert, ``probs`` one list of class probabilities per expert.
``overhead_ms`` and ``budget`` may be left out (0, unbounded). Every error names the file and
the field, e.g. ``problem.json: samples[3].probs[1]: expected 4 class probabilities, got 3``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moesaic.budget import UNBOUNDED, Budget
from moesaic.config import describe_errors, read_text_file
from moesaic.coordinator.selection import ExpertCost, SelectionProblem

__all__ = ["ProblemError", "load_problem", "parse_problem"]


class ProblemError(ValueError):
    """A problem file that cannot be used; the message names the file and field."""


class _Expert(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str = Field(min_length=1, description="expert id, e.g. node/model")
    device: str = Field(min_length=1, description="device the expert runs on; experts on one device queue")
    latency_ms: float = Field(ge=0, allow_inf_nan=False)
    energy_mj: float = Field(ge=0, allow_inf_nan=False)


class _Sample(BaseModel):
    model_config = ConfigDict(extra="forbid")
    label: int = Field(ge=0)
    gate: list[float]
    probs: list[list[float]]


class _Problem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    overhead_ms: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    experts: list[_Expert] = Field(min_length=1)
    samples: list[_Sample] = Field(min_length=1)
    budget: Budget = Field(default=UNBOUNDED)


def parse_problem(data: Any, *, source: str = "problem") -> tuple[SelectionProblem, Budget]:
    """Validate a decoded problem document; ``ProblemError`` names ``source`` and the field."""
    try:
        doc = _Problem.model_validate(data)
    except ValidationError as exc:
        raise ProblemError(f"{source}: {describe_errors(exc)}") from None
    n = len(doc.experts)
    ids = [e.id for e in doc.experts]
    for i, e in enumerate(doc.experts):
        if e.id in ids[:i]:
            raise ProblemError(f"{source}: experts[{i}].id: duplicate expert id {e.id!r}")
    q = np.empty((len(doc.samples), n))
    gate = np.empty((len(doc.samples), n))
    for s, sample in enumerate(doc.samples):
        where = f"{source}: samples[{s}]"
        if len(sample.gate) != n:
            raise ProblemError(f"{where}.gate: expected {n} weights (one per expert), got {len(sample.gate)}")
        for j, g in enumerate(sample.gate):
            if not (math.isfinite(g) and g >= 0):
                raise ProblemError(f"{where}.gate[{j}]: expected a finite weight >= 0, got {g}")
        if sum(sample.gate) <= 0:
            raise ProblemError(f"{where}.gate: weights must not all be 0")
        if len(sample.probs) != n:
            raise ProblemError(f"{where}.probs: expected {n} lists (one per expert), got {len(sample.probs)}")
        classes = len(sample.probs[0])
        if sample.label >= classes:
            raise ProblemError(f"{where}.label: {sample.label} is not a class index below {classes}")
        for j, probs in enumerate(sample.probs):
            if len(probs) != classes:
                raise ProblemError(
                    f"{where}.probs[{j}]: expected {classes} class probabilities, got {len(probs)}"
                )
            for c, p in enumerate(probs):
                if not (math.isfinite(p) and 0 <= p <= 1):
                    raise ProblemError(f"{where}.probs[{j}][{c}]: expected a probability in [0, 1], got {p}")
            q[s, j] = probs[sample.label]
        gate[s] = sample.gate
    experts = tuple(ExpertCost(e.id, e.device, e.latency_ms, e.energy_mj) for e in doc.experts)
    problem = SelectionProblem(experts, q, gate, doc.overhead_ms)
    return problem, doc.budget


def load_problem(path: Path) -> tuple[SelectionProblem, Budget]:
    """Read and validate a problem JSON file."""
    try:
        text = read_text_file(path)
    except ValueError as exc:
        raise ProblemError(str(exc)) from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProblemError(
            f"{path}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    return parse_problem(data, source=str(path))
