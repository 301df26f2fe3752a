"""Attributed energy through a real node, with an energy counter that steps coarsely like NVML.

The counter is the only fake: it reads this process's CPU time (so it moves with the work the
node really does) plus a fixed idle draw, and updates only every 250 ms. Everything else is
the product path: gRPC on loopback, validation, the model's queue, ONNX Runtime, the cost meter.
Over a 30 s run (15 s with one client, 15 s with four):

- Σ attributed energy = the counter's delta minus idle power x time, within 10 %
  (idle measured from the counter with the load off);
- a request of a fixed model costs the same (±15 %) with one client and with four;
- the replies' per-request figures vary little (coefficient of variation <= 25 %).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from moesaic.nodes.config import load_node_config
from moesaic.nodes.server import NodeServer
from moesaic.runtime.energy import EnergyMeter
from tests.helpers.onnx_models import write_matmul_model

pytestmark = pytest.mark.timeout(120)

IDLE_W = 40.0
JOULES_PER_CPU_S = 25.0


class SteppingCpuCounter(EnergyMeter):
    """idle x time + 25 J per CPU-second of this process, updated every ``step_s`` only."""

    source = "rapl"
    measured = True

    def __init__(self, step_s: float = 0.1) -> None:
        self.step_s = step_s
        self._t0, self._c0 = time.monotonic(), time.process_time()
        self._updated = self._t0
        self._value = 0.0
        self._lock = threading.Lock()

    def exact(self) -> float:
        return IDLE_W * (time.monotonic() - self._t0) + JOULES_PER_CPU_S * (time.process_time() - self._c0)

    def joules(self) -> float:
        with self._lock:
            now = time.monotonic()
            if now - self._updated >= self.step_s:
                self._value, self._updated = self.exact(), now
            return self._value


_CLIENTS = """
import json, sys, threading, time
import grpc, numpy as np
from moesaic.nodes.codec import decode_response, encode_request
address, clients, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
request = encode_request("mm", {"x": np.ones((64, 256), np.float32)})
figures, lock, stop_at = [], threading.Lock(), time.monotonic() + seconds
def client():
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        while time.monotonic() < stop_at:
            p = decode_response(call(request, timeout=10))[0].parameters
            with lock:
                figures.append((p["energy_mj"].double_param, p["compute_ms"].double_param))
threads = [threading.Thread(target=client) for _ in range(clients)]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(figures))
"""


def _load(address: str, clients: int, seconds: float) -> list[tuple[float, float]]:
    """``clients`` threads of another process calling back to back (their CPU time is not the
    node's); (energy_mj, compute_ms) of every reply."""
    done = subprocess.run(
        [sys.executable, "-c", _CLIENTS, address, str(clients), str(seconds)],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
        check=True,
    )
    return [tuple(f) for f in json.loads(done.stdout)]


def test_attributed_energy_adds_up_and_is_the_same_under_concurrency(tmp_path: Path) -> None:
    write_matmul_model(tmp_path, "mm", model_yaml="engine: {type: onnxruntime, intra_op_threads: 1}\n")
    counter = SteppingCpuCounter()
    config = load_node_config(env={}, overrides={"listen": "127.0.0.1:0", "models": tmp_path})
    node = NodeServer(config, meter=counter)
    node.start()
    try:
        assert node.wait_ready(60)
        # Idle, measured from the counter itself with the load off.
        time.sleep(0.5)
        j0, t0 = counter.exact(), time.monotonic()
        time.sleep(2.5)
        idle_w = (counter.exact() - j0) / (time.monotonic() - t0)
        assert node.cost.idle_watts == pytest.approx(idle_w, rel=0.10)

        before = node.cost.snapshot()
        _load(node.address, 1, 2.0)  # warm-up: the model's running rate settles
        one = _load(node.address, 1, 13.0)
        _load(node.address, 4, 2.0)
        four = _load(node.address, 4, 13.0)
        time.sleep(0.6)  # the last intervals close
        after = node.cost.snapshot()
    finally:
        node.stop(grace=0)

    seconds = after.seconds - before.seconds
    dynamic = (after.device_joules - before.device_joules) - idle_w * seconds
    attributed = after.attributed_joules - before.attributed_joules
    assert seconds > 29
    assert attributed == pytest.approx(dynamic, rel=0.10)

    means = {}
    for label, figures in (("one", one), ("four", four)):
        energy = [mj for mj, _ in figures]
        assert all(mj > 0 for mj in energy), f"{label}: a reply carried no energy"
        means[label] = statistics.fmean(energy)
        cv = statistics.pstdev(energy) / means[label]
        compute = [ms for _, ms in figures]
        compute_cv = statistics.pstdev(compute) / statistics.fmean(compute)
        assert cv <= 0.25, (
            f"{label} client(s): per-request energy CV {cv:.2f} (compute CV {compute_cv:.2f}, "
            f"mean {means[label]:.1f} mJ, quantiles {statistics.quantiles(energy, n=10)})"
        )
    assert means["four"] == pytest.approx(means["one"], rel=0.15)
