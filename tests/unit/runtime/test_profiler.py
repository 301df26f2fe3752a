"""Profiler: latency quantiles, throughput, energy with the idle draw subtracted, profile files."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest

from moesaic.runtime.energy import EstimateMeter, SampledPowerMeter
from moesaic.runtime.profiler import (
    LatencyQuantiles,
    ProfileRecord,
    load_profile_file,
    profile_engine,
    write_profile_file,
)


class BusyEngine:
    """Sleeps ``seconds`` per call and raises the power reading while it runs."""

    backend = "test"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.busy = threading.Event()
        self.calls = 0

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.busy.set()
        time.sleep(self.seconds)
        self.busy.clear()
        self.calls += 1
        return {"y": inputs["x"]}


def _record(**kw: object) -> ProfileRecord:
    base: dict[str, object] = dict(
        model="det",
        device="cuda:0",
        engine="torch",
        batch_size=4,
        latency_ms=LatencyQuantiles(3.0, 3.5, 4.0),
        throughput_per_s=1000.0,
        energy_mj_per_inference=250.0,
        idle_watts=60.0,
        energy_source="nvml",
    )
    base.update(kw)
    return ProfileRecord(**base)  # type: ignore[arg-type]


def test_profile_file_round_trip(tmp_path: Path) -> None:
    records = [_record(), _record(batch_size=1, energy_source="estimate", idle_watts=0.0)]
    path = tmp_path / "profile.json"
    write_profile_file(path, records)
    raw = json.loads(path.read_text())
    assert raw[0] == {
        "model": "det",
        "device": "cuda:0",
        "engine": "torch",
        "batch_size": 4,
        "latency_ms": {"p50": 3.0, "p95": 3.5, "p99": 4.0},
        "throughput_per_s": 1000.0,
        "energy_mj_per_inference": 250.0,
        "idle_watts": 60.0,
        "energy_source": "nvml",
    }
    loaded = load_profile_file(path)
    assert loaded == records
    assert loaded[0].latency_ms.p95 == loaded[0].latency_ms["p95"] == 3.5
    assert loaded[0].measured and not loaded[1].measured


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"energy_source": "guess"}, r"\[0\]\.energy_source"),
        ({"batch_size": 0}, r"\[0\]\.batch_size"),
        ({"batch_size": "4"}, r"\[0\]\.batch_size"),
        ({"idle_watts": -1.0}, r"\[0\]\.idle_watts"),
        ({"latency_ms": {"p50": 1.0}}, r"\[0\]\.latency_ms"),
        ({"latency_ms": 3.0}, r"\[0\]\.latency_ms"),
        ({"throughput_per_s": None}, r"\[0\]\.throughput_per_s"),
        ({"extra": 1}, "unknown fields \\['extra'\\]"),
    ],
)
def test_bad_profile_file_names_record_and_field(
    tmp_path: Path, change: dict[str, object], message: str
) -> None:
    item = {**_record().to_dict(), **change}
    path = tmp_path / "p.json"
    path.write_text(json.dumps([item]))
    with pytest.raises(ValueError, match=message):
        load_profile_file(path)


def test_profile_file_must_be_a_json_list(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text('{"model": "x"}')
    with pytest.raises(ValueError, match="JSON list"):
        load_profile_file(path)
    path.write_text("[{")
    with pytest.raises(ValueError, match="not JSON"):
        load_profile_file(path)


def test_profile_subtracts_idle_draw() -> None:
    engine = BusyEngine(0.02)
    idle_w, busy_w = 20.0, 50.0
    meter = SampledPowerMeter(
        lambda: busy_w if engine.busy.is_set() else idle_w, source="nvml", interval_s=0.002
    )
    try:
        runs: list[int] = []
        record = profile_engine(
            engine,
            {"x": np.zeros((2, 3), np.float32)},
            runs=15,
            warmup=2,
            meter=meter,
            idle_s=0.2,
            model="m",
            device="cpu",
            on_run=runs.append,
        )
    finally:
        meter.close()
    assert engine.calls == 17 and runs == list(range(1, 16))
    assert record.batch_size == 2 and record.engine == "test" and record.energy_source == "nvml"
    assert record.idle_watts == pytest.approx(idle_w, rel=0.05)
    assert 20.0 <= record.latency_ms.p50 <= record.latency_ms.p95 <= record.latency_ms.p99
    assert record.throughput_per_s == pytest.approx(2 / (record.latency_ms.p50 / 1000), rel=0.5)
    # (50 W - 20 W) x ~20 ms busy per call = ~600 mJ; sampling jitter allows a wide margin
    expected = (busy_w - idle_w) * record.latency_ms.p50
    assert record.energy_mj_per_inference == pytest.approx(expected, rel=0.35)


def test_profile_min_duration_extends_runs() -> None:
    engine = BusyEngine(0.005)
    with EstimateMeter(10.0) as meter:
        record = profile_engine(
            engine, {"x": np.zeros((1,), np.float32)}, runs=2, warmup=0, meter=meter, min_duration_s=0.2
        )
    assert engine.calls >= 10
    assert record.idle_watts == 0.0 and record.energy_source == "estimate"
    # estimate: 10 W over the busy time, per call
    assert record.energy_mj_per_inference == pytest.approx(10.0 * record.latency_ms.p50, rel=0.5)


@pytest.mark.parametrize(("kw", "field"), [({"runs": 0}, "runs"), ({"warmup": -1}, "warmup")])
def test_profile_rejects_bad_counts(kw: dict[str, int], field: str) -> None:
    args = {"runs": 1, "warmup": 0, **kw}
    with EstimateMeter(1.0) as meter, pytest.raises(ValueError, match=field):
        profile_engine(BusyEngine(0.0), {"x": np.zeros(1, np.float32)}, meter=meter, **args)
