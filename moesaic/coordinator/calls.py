"""One expert call and what it teaches: the gRPC ModelInfer with its deadline, its outcome
folded into the request's :class:`Run`, the replica's live profile and health, and metrics.

>>> caller = Caller(registry, metrics)                                   # doctest: +SKIP
>>> outcome = await caller.call(expert, inputs, deadline=time.monotonic() + 0.2)
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from dataclasses import dataclass

import grpc

from moesaic.coordinator.inputs import RequestInputs
from moesaic.coordinator.registry import Expert, Registry
from moesaic.metrics import Metrics
from moesaic.nodes.client import InferResult

__all__ = ["Caller", "ExpertCall", "Run"]


@dataclass
class Run:
    """One expert's part in a request (one replica's attempt)."""

    expert: Expert
    status: str = "running"
    """"ok", "deadline", "error" or "cancelled"."""
    latency_ms: float = 0.0
    energy_mj: float = 0.0
    energy_measured: bool = False
    weight: float = 0.0
    error: str = ""
    tiles: int = 0


@dataclass(frozen=True)
class ExpertCall:
    """The outcome of one expert call."""

    result: InferResult | None
    latency_ms: float
    status: str
    error: str = ""
    unreachable: bool = False


class Caller:
    """Calls experts through their replica's node client and learns from every outcome."""

    def __init__(self, registry: Registry, metrics: Metrics | None = None) -> None:
        self.registry = registry
        self.metrics = metrics
        self._ids = itertools.count()

    async def call(self, expert: Expert, inputs: RequestInputs, deadline: float) -> ExpertCall:
        """One ModelInfer that gives up at ``deadline`` (monotonic); never raises."""
        replica = expert.replica
        timeout = max(deadline - time.monotonic(), 0.001)
        call_id = next(self._ids)
        replica.profile.begin(call_id, time.monotonic())
        t0 = time.perf_counter()
        try:
            result = await asyncio.wait_for(
                self.registry.client(replica).infer(
                    replica.model, inputs.tensors, parameters=inputs.parameters or None, timeout=timeout
                ),
                timeout + 0.5,
            )
        except grpc.aio.AioRpcError as exc:
            ms = (time.perf_counter() - t0) * 1e3
            code = exc.code()
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return ExpertCall(None, ms, "deadline", f"no reply within {timeout * 1e3:.0f} ms")
            return ExpertCall(
                None, ms, "error", f"{code.name}: {exc.details()}", code == grpc.StatusCode.UNAVAILABLE
            )
        except TimeoutError:
            ms = (time.perf_counter() - t0) * 1e3
            return ExpertCall(None, ms, "deadline", f"no reply within {timeout * 1e3:.0f} ms")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bad reply must not fail the request: it is this expert's error
            return ExpertCall(None, (time.perf_counter() - t0) * 1e3, "error", f"{type(exc).__name__}: {exc}")
        finally:
            replica.profile.end(call_id)
        return ExpertCall(result, (time.perf_counter() - t0) * 1e3, "ok")

    def record(self, run: Run, outcome: ExpertCall) -> None:
        """Fold one outcome into the run, the replica's profile and health, and metrics."""
        expert, replica = run.expert, run.expert.replica
        run.status = outcome.status
        run.latency_ms += outcome.latency_ms
        run.error = outcome.error
        if outcome.result is not None:
            res = outcome.result
            run.energy_mj += res.energy_mj if math.isfinite(res.energy_mj) else expert.energy_mj
            run.energy_measured = res.energy_measured
            self.registry.observe(replica, res, outcome.latency_ms)
        elif outcome.status == "deadline":
            run.energy_mj += expert.energy_mj  # it may have run: the predicted cost, marked as an estimate
            self.registry.observe_timeout(replica, outcome.latency_ms)
        elif outcome.unreachable:
            self.registry.record_failure(replica, outcome.error, unreachable=True)
        else:
            self.registry.record_expert_error(replica, outcome.error)
        if self.metrics is not None:
            self.metrics.expert_latency.labels(expert=replica.id).observe(outcome.latency_ms / 1e3)
            if outcome.status != "error":
                source = "measured" if run.energy_measured else "estimate"
                self.metrics.energy.labels(expert=replica.id, source=source).inc(
                    max(run.energy_mj, 0.0) / 1e3
                )
