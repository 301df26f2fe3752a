"""Measured cost of a model on a device: latency quantiles, throughput, energy per inference.

:func:`profile_engine` warms the engine up, measures the idle draw, then times ``runs``
inferences while an :class:`~moesaic.runtime.energy.EnergyMeter` counts joules; energy per
inference is the loaded energy minus the idle draw over the same time, per call::

    record = profile_engine(engine, inputs, runs=50, warmup=5, meter=meter, model="ppn_seg")
    write_profile_file(Path("profile.json"), [record])

The profile file is a JSON list of records (the node serves it in Describe, the coordinator
reads it)::

    [{"model": "ppn_seg", "device": "cuda:0", "engine": "torch", "batch_size": 1,
      "latency_ms": {"p50": 3.1, "p95": 3.4, "p99": 3.9}, "throughput_per_s": 318.0,
      "energy_mj_per_inference": 410.0, "idle_watts": 61.5, "energy_source": "nvml"}]

``energy_mj_per_inference`` is per call at ``batch_size``; ``throughput_per_s`` counts items
(calls x batch size). With an estimate meter the idle draw cannot be measured: ``idle_watts``
is 0 and the energy is the estimated wattage over the busy time.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.runtime.energy import ENERGY_SOURCES, EnergyMeter

__all__ = [
    "LatencyQuantiles",
    "ProfileRecord",
    "load_profile_file",
    "profile_engine",
    "write_profile_file",
]


@dataclass(frozen=True)
class LatencyQuantiles(Mapping[str, float]):
    """Latency quantiles in milliseconds; reads as ``q.p50`` or ``q["p50"]``."""

    p50: float
    p95: float
    p99: float

    def __getitem__(self, key: str) -> float:
        if key not in ("p50", "p95", "p99"):
            raise KeyError(key)
        return float(getattr(self, key))

    def __iter__(self) -> Iterator[str]:
        return iter(("p50", "p95", "p99"))

    def __len__(self) -> int:
        return 3

    @classmethod
    def of(cls, latencies_ms: Sequence[float]) -> LatencyQuantiles:
        p50, p95, p99 = np.percentile(np.asarray(latencies_ms, dtype=np.float64), [50, 95, 99])
        return cls(float(p50), float(p95), float(p99))


@dataclass(frozen=True)
class ProfileRecord:
    """The measured cost of one model on one device at one batch size."""

    model: str
    device: str
    engine: str
    batch_size: int
    latency_ms: LatencyQuantiles
    throughput_per_s: float
    energy_mj_per_inference: float
    idle_watts: float
    energy_source: str
    stages_ms: Mapping[str, float] = field(default_factory=dict)
    """Median milliseconds of each stage on the node's path (codec, preprocess, engine,
    postprocess); empty for an engine-only profile."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")
        if self.energy_source not in ENERGY_SOURCES:
            raise ValueError(f"energy_source: expected one of {ENERGY_SOURCES}, got {self.energy_source!r}")
        for name in ("throughput_per_s", "energy_mj_per_inference", "idle_watts"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}: must be a finite number >= 0, got {value}")

    @property
    def measured(self) -> bool:
        """True when the energy numbers come from a meter, not an estimate."""
        return self.energy_source != "estimate"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["latency_ms"] = dict(self.latency_ms)
        data["stages_ms"] = dict(self.stages_ms)
        if not self.stages_ms:  # an engine-only profile: files read as before
            del data["stages_ms"]
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, where: str = "profile") -> ProfileRecord:
        """Validate one record; ``ValueError`` names ``where`` and the field."""
        if not isinstance(data, Mapping):
            raise ValueError(f"{where}: expected an object, got {type(data).__name__}")
        expected = {f for f in cls.__dataclass_fields__}
        missing, unknown = expected - set(data) - {"stages_ms"}, set(data) - expected
        if missing or unknown:
            raise ValueError(f"{where}: missing fields {sorted(missing)}, unknown fields {sorted(unknown)}")
        try:
            lat = data["latency_ms"]
            if not isinstance(lat, Mapping):
                raise ValueError("expected an object {p50, p95, p99}")
            quantiles = LatencyQuantiles(float(lat["p50"]), float(lat["p95"]), float(lat["p99"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{where}.latency_ms: {exc}") from None
        values: dict[str, Any] = {"latency_ms": quantiles}
        stages = data.get("stages_ms", {})
        if not isinstance(stages, Mapping) or not all(
            isinstance(v, int | float) and not isinstance(v, bool) for v in stages.values()
        ):
            raise ValueError(f"{where}.stages_ms: expected an object of stage -> milliseconds")
        values["stages_ms"] = {str(k): float(v) for k, v in stages.items()}
        for name, kind in (("model", str), ("device", str), ("engine", str), ("energy_source", str)):
            if not isinstance(data[name], kind):
                raise ValueError(f"{where}.{name}: expected a string, got {data[name]!r}")
            values[name] = data[name]
        if not isinstance(data["batch_size"], int) or isinstance(data["batch_size"], bool):
            raise ValueError(f"{where}.batch_size: expected an integer, got {data['batch_size']!r}")
        values["batch_size"] = data["batch_size"]
        for name in ("throughput_per_s", "energy_mj_per_inference", "idle_watts"):
            if not isinstance(data[name], int | float) or isinstance(data[name], bool):
                raise ValueError(f"{where}.{name}: expected a number, got {data[name]!r}")
            values[name] = float(data[name])
        try:
            return cls(**values)
        except ValueError as exc:
            raise ValueError(f"{where}.{exc}") from None


def load_profile_file(path: Path | str) -> list[ProfileRecord]:
    """Records of a profile file; ``ValueError`` naming the file, record and field when bad."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not JSON: {exc}") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of profile records")
    return [ProfileRecord.from_dict(item, where=f"{path}[{i}]") for i, item in enumerate(data)]


def write_profile_file(path: Path | str, records: Sequence[ProfileRecord]) -> None:
    """Write ``records`` as a JSON list (atomically: a reader never sees half a file)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps([r.to_dict() for r in records], indent=2) + "\n")
    tmp.replace(path)


def profile_engine(
    engine: Any,
    inputs: Mapping[str, np.ndarray],
    *,
    runs: int,
    warmup: int,
    meter: EnergyMeter,
    idle_s: float = 1.0,
    min_duration_s: float = 0.0,
    model: str = "",
    device: str = "",
    batch_size: int | None = None,
    on_run: Callable[[int], None] | None = None,
) -> ProfileRecord:
    """Measure a loaded engine (anything with ``infer(inputs)``) on fixed ``inputs``.

    1. ``warmup`` untimed calls; 2. ``idle_s`` seconds of idle draw; 3. at least ``runs`` timed
    calls, more until ``min_duration_s`` has passed (energy counters tick every few tens of
    ms, so short runs need a floor). ``on_run(i)`` is called after each timed call (progress).
    """
    if runs < 1:
        raise ValueError(f"runs: must be >= 1, got {runs}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0, got {warmup}")
    if batch_size is None:
        first = next(iter(inputs.values()), None)
        batch_size = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
    for _ in range(warmup):
        engine.infer(inputs)

    idle_watts = 0.0
    if meter.measured and idle_s > 0:
        j0, t0 = meter.joules(), time.perf_counter()
        time.sleep(idle_s)
        j1, t1 = meter.joules(), time.perf_counter()
        idle_watts = max(0.0, (j1 - j0) / (t1 - t0))

    latencies: list[float] = []
    j_start, t_start = meter.joules(), time.perf_counter()
    while len(latencies) < runs or time.perf_counter() - t_start < min_duration_s:
        t = time.perf_counter()
        engine.infer(inputs)
        latencies.append((time.perf_counter() - t) * 1000.0)
        if on_run is not None:
            on_run(len(latencies))
    j_end, t_end = meter.joules(), time.perf_counter()

    elapsed = t_end - t_start
    calls = len(latencies)
    active_joules = max(0.0, (j_end - j_start) - idle_watts * elapsed)
    return ProfileRecord(
        model=model,
        device=device,
        engine=str(getattr(engine, "backend", type(engine).__name__)),
        batch_size=batch_size,
        latency_ms=LatencyQuantiles.of(latencies),
        throughput_per_s=calls * batch_size / elapsed,
        energy_mj_per_inference=active_joules / calls * 1000.0,
        idle_watts=idle_watts,
        energy_source=meter.source,
    )
