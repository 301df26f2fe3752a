"""Load a node with one and then four clients and read what its cost meter attributed.

Shared by the energy tests (CPU with a stepping counter, GPU with NVML) and
``bench/node_energy.py``. Clients run in another process, as real ones do, so their own CPU
time is not the node's. The idle draw is measured from the node's energy source itself with
the load off, before the load starts.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.nodes.server import NodeServer

__all__ = ["ClientsRun", "EnergyRun", "measure_energy", "run_clients"]

_CLIENTS = """
import json, sys, threading, time
import grpc, numpy as np
from moesaic.nodes.codec import decode_response, encode_request
address, model, clients, seconds, path = sys.argv[1:6]
array = np.load(path)
request = encode_request(model, {"x": array})
figures, lock, stop_at = [], threading.Lock(), time.monotonic() + float(seconds)
def client():
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        while time.monotonic() < stop_at:
            p = decode_response(call(request, timeout=30))[0].parameters
            with lock:
                figures.append((p["energy_mj"].double_param, p["compute_ms"].double_param))
threads = [threading.Thread(target=client) for _ in range(int(clients))]
for t in threads: t.start()
for t in threads: t.join()
print(json.dumps(figures))
"""


@dataclass
class ClientsRun:
    """Replies of one phase: each reply's energy (mJ) and compute time (ms)."""

    clients: int
    energy_mj: list[float]
    compute_ms: list[float]
    dynamic_j: float = 0.0
    """The source's counter over this phase minus idle (measured with the load off) x its time."""

    @property
    def mean_mj(self) -> float:
        return statistics.fmean(self.energy_mj)

    @property
    def dynamic_mj_per_request(self) -> float:
        """What one request of this phase really cost, by the counter (not by the meter)."""
        return 1e3 * self.dynamic_j / len(self.energy_mj)

    @property
    def cv(self) -> float:
        return statistics.pstdev(self.energy_mj) / self.mean_mj if self.mean_mj else float("inf")


@dataclass
class EnergyRun:
    """What the node's meter saw over the loaded phases, against its source's own counter."""

    source: str
    idle_w_measured: float
    idle_w_learnt: float
    seconds: float
    device_j: float
    attributed_j: float
    phases: list[ClientsRun] = field(default_factory=list)

    @property
    def dynamic_j(self) -> float:
        """The counter's delta minus idle (measured with the load off) x time."""
        return self.device_j - self.idle_w_measured * self.seconds

    @property
    def sum_error(self) -> float:
        """(Σ attributed - dynamic) / dynamic."""
        return (self.attributed_j - self.dynamic_j) / self.dynamic_j

    def summary(self) -> dict[str, Any]:
        out = asdict(self)
        for phase, run in zip(out["phases"], self.phases, strict=True):
            phase.update(
                mean_mj=run.mean_mj,
                cv=run.cv,
                requests=len(run.energy_mj),
                dynamic_mj_per_request=run.dynamic_mj_per_request,
            )
            del phase["energy_mj"], phase["compute_ms"]
        out.update(dynamic_j=self.dynamic_j, sum_error=self.sum_error)
        return out


def run_clients(address: str, model: str, array: np.ndarray, clients: int, seconds: float) -> ClientsRun:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "input.npy"
        np.save(path, array)
        args = [address, model, str(clients), str(seconds), str(path)]
        done = subprocess.run(
            [sys.executable, "-c", _CLIENTS, *args], capture_output=True, text=True, timeout=seconds + 120
        )
    if done.returncode:
        raise RuntimeError(f"clients failed: {done.stderr[-2000:]}")
    figures = json.loads(done.stdout)
    return ClientsRun(clients, [e for e, _ in figures], [c for _, c in figures])


def measure_energy(
    node: NodeServer,
    model: str,
    array: np.ndarray,
    *,
    seconds: float = 15.0,
    warmup_s: float = 2.0,
    idle_s: float = 3.0,
    clients: tuple[int, ...] = (1, 4),
) -> EnergyRun:
    """Idle (load off), then ``seconds`` of each client count (after ``warmup_s`` of it)."""
    source = node.cost.meter
    time.sleep(0.5)
    j0, t0 = source.joules(), time.monotonic()
    time.sleep(idle_s)
    idle_w = (source.joules() - j0) / (time.monotonic() - t0)
    before = node.cost.snapshot()
    phases = []
    for n in clients:
        run_clients(node.address, model, array, n, warmup_s)  # the running figure settles
        j0, t0 = source.joules(), time.monotonic()
        phase = run_clients(node.address, model, array, n, seconds)
        phase.dynamic_j = source.joules() - j0 - idle_w * (time.monotonic() - t0)
        phases.append(phase)
    time.sleep(max(0.6, 5 * node.cost.interval_s))  # the last intervals close
    after = node.cost.snapshot()
    return EnergyRun(
        source=node.cost.source,
        idle_w_measured=idle_w,
        idle_w_learnt=after.idle_watts,
        seconds=after.seconds - before.seconds,
        device_j=after.device_joules - before.device_joules,
        attributed_j=after.attributed_joules - before.attributed_joules,
        phases=phases,
    )
