"""``moesaic profile`` runs its calls as a node's requests arrive: over a pool of threads, with gaps."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from moesaic.metrics import Metrics
from moesaic.nodes.dataplane import DataPlane
from moesaic.nodes.profiling import _ThreadRotation, profile_served
from moesaic.nodes.repository import scan_models
from moesaic.runtime.cost import CostMeter
from moesaic.runtime.devices import discover_device
from moesaic.runtime.energy import EstimateMeter
from tests.helpers.onnx_models import write_identity_model


def test_calls_take_the_threads_in_turn() -> None:
    rotation = _ThreadRotation(threading.get_ident, 3)
    try:
        seen = [rotation() for _ in range(7)]
    finally:
        rotation.close()
    assert len(set(seen[:3])) == 3 and threading.get_ident() not in seen
    assert seen[3:6] == seen[:3] and seen[6] == seen[0]


def test_one_thread_is_the_callers_own_and_errors_reach_the_caller() -> None:
    assert _ThreadRotation(threading.get_ident, 1)() == threading.get_ident()
    calls = iter([None, 7])

    def fn() -> int:
        item = next(calls)
        if item is None:
            raise ValueError("bad input")
        return item

    rotation = _ThreadRotation(fn, 2)
    try:
        with pytest.raises(ValueError, match="bad input"):
            rotation()
        assert rotation() == 7  # the rotation still works after a failed call
    finally:
        rotation.close()


def test_profile_over_threads_times_every_run(tmp_path: Path) -> None:
    write_identity_model(tmp_path, "echo", [("x", "FP32", (-1, 4))])
    (model,) = scan_models(tmp_path)
    device = discover_device("cpu")
    with CostMeter(EstimateMeter(10.0), device=device.id, interval_s=0.02) as cost:
        model.load(device, cost=cost)
        try:
            plane = DataPlane({model.name: model}, cost, Metrics(component="test"))
            runs: list[int] = []
            record = profile_served(
                plane,
                model,
                {"x": np.ones((2, 4), np.float32)},
                runs=20,
                warmup=1,
                idle_s=0.0,
                on_run=runs.append,
                threads=3,
                gap_s=0.0002,
            )
        finally:
            model.close()
    assert runs == list(range(1, 21))
    assert record.batch_size == 2 and record.latency_ms.p50 > 0
    assert record.stages_ms["engine"] <= record.latency_ms.p99
    assert record.energy_mj_per_inference > 0  # the estimate's watts x the calls' busy time
    assert not [t for t in threading.enumerate() if t.name.startswith("profile-")]
