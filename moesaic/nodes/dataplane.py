"""The node's data plane: one transport-free path for every inference request.

    validate (caller, :mod:`moesaic.nodes.validation`) -> queue -> batch -> pre-process
        -> engine -> post-process -> account

Transports (the gRPC servicer today) decode a request, hand the validated tensors to
:meth:`DataPlane.infer` with the request's deadline, and encode the :class:`Reply`. Nothing
here knows about gRPC. A model without dynamic batching waits in its
:class:`~moesaic.nodes.scheduling.ModelQueue` (earliest deadline first; expired work is
dropped before it starts, never computed); a model with it goes through its
:class:`~moesaic.nodes.batching.DynamicBatcher`. Accounting is the device's
:class:`~moesaic.runtime.cost.CostMeter`: the request's busy time (pre + engine share +
post) is registered there, the meter splits each interval's dynamic energy by busy time, and a
reply carries the model's attributed joules per completed request; no meter is read on the
request path.

Versions: :attr:`DataPlane.models` maps each model name to the version serving requests that
name none (the highest served); :attr:`DataPlane.versions` holds every served version. The
model lifecycle (:mod:`moesaic.nodes.lifecycle`) swaps entries of both atomically; a request
holds the version it resolved (:meth:`~moesaic.nodes.repository.ServedModel.acquire`) until
it is answered, so a retired version finishes its work before it closes.

>>> # plane = DataPlane(models, cost, metrics)
>>> # reply = plane.infer(plane.ready_model("yolo-n"), {"image": frame}, {}, deadline=t)
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moesaic.errors import DeadlineExceeded, InvalidInput, NotFound, Unavailable, quote
from moesaic.metrics import Metrics
from moesaic.nodes.scheduling import ModelQueue, QueueState
from moesaic.nodes.served import ServedModel
from moesaic.runtime.cost import CostMeter

__all__ = ["DataPlane", "Reply", "Stages"]

log = logging.getLogger(__name__)

PROBE_SENSOR = "moesaic-probe"
"""The ``sensor_id`` of probe requests, so a stream's temporal state never mixes with them."""


@dataclass(slots=True)
class Stages:
    """Seconds of each stage of one request (engine: its share of the batch)."""

    queue: float = 0.0
    preprocess: float = 0.0
    engine: float = 0.0
    postprocess: float = 0.0

    @property
    def compute(self) -> float:
        return self.preprocess + self.engine + self.postprocess


@dataclass(slots=True)
class Reply:
    """What one request produced and cost, and the queue it leaves behind."""

    outputs: dict[str, np.ndarray]
    stages: Stages
    energy_j: float
    energy_source: str
    queue: QueueState


class DataPlane:
    """Queue, batch, run and account the requests of a node's models."""

    def __init__(
        self,
        models: dict[str, ServedModel],
        cost: CostMeter,
        metrics: Metrics,
        *,
        versions: dict[str, dict[int, ServedModel]] | None = None,
    ) -> None:
        self.models = models
        self.versions: dict[str, dict[int, ServedModel]] = versions or {
            name: {m.version: m} for name, m in models.items()
        }
        self.unloaded: set[str] = set()
        """Names unloaded from this node (their requests are told so)."""
        self.cost = cost
        self.metrics = metrics
        # Metric children looked up once (``labels()`` is slow); latencies are observed off the
        # request path, by :meth:`flush_metrics` (the cost meter's thread calls it).
        self._latency: dict[str, Any] = {}
        self._latencies: deque[tuple[str, float]] = deque()
        self._expired: dict[str, Any] = {}
        self._last_done: dict[str, float] = {}
        for name in models:
            self.register(name)

    def register(self, name: str) -> None:
        """Prepare the per-model metric children of ``name`` (a model loaded while serving)."""
        if name not in self._latency:
            self._latency[name] = self.metrics.expert_latency.labels(expert=name)
            self._expired[name] = self.metrics.requests_expired.labels(model=name)
        self._last_done[name] = time.monotonic()

    @property
    def queues(self) -> dict[str, ModelQueue]:
        """The queue of the version serving each model now."""
        return {name: m.queue for name, m in list(self.models.items())}

    def served(self) -> list[ServedModel]:
        """Every served version of every model (a snapshot)."""
        return [m for group in list(self.versions.values()) for m in list(group.values())]

    # -------------------------------------------------------------- lookup

    def model(self, name: str, version: str = "") -> ServedModel:
        """The version ``version`` of ``name`` (empty: the one serving requests naming none);
        :class:`NotFound` for an unknown model or a version not served."""
        model = self.models.get(name)
        if model is None:
            if name in self.unloaded:
                raise NotFound(
                    f"model {quote(name)} is unloaded; load it again to serve it", reason="unloaded"
                )
            raise NotFound(f"model {quote(name)} not found; this node serves {sorted(self.models)}")
        if not version or version == model.version_str:
            return model
        served = self.versions.get(name, {})
        found = served.get(int(version)) if version.isdigit() and len(version) < 10 else None
        if found is None:
            raise NotFound(
                f"model {name!r} version {quote(version, 16)} not found; served versions: "
                f"{sorted(served) or 'none'}",
                reason="unknown_version",
            )
        return found

    def ready_model(self, name: str, version: str = "") -> ServedModel:
        model = self.model(name, version)
        if model.state != "ready":
            detail = f": {model.error}" if model.error else ""
            raise Unavailable(f"model {name!r} is {model.state}{detail}", reason=f"model_{model.state}")
        return model

    def queue_state(self, model: ServedModel) -> QueueState:
        """Depth and expected wait of ``model``'s queue now."""
        batcher = model.batcher
        if batcher is not None:
            return QueueState(batcher.queued(), batcher.expected_wait_s(), batcher.batch_s)
        return model.queue.state()

    # -------------------------------------------------------------- the request path

    def infer(
        self,
        model: ServedModel,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, Any],
        *,
        requested: Sequence[str] = (),
        deadline: float | None = None,
        alive: Callable[[], bool] | None = None,
    ) -> Reply:
        """Run one validated request; :class:`DeadlineExceeded` when it expired before running.

        ``deadline``: monotonic seconds; ``alive``: asked while the request waits in the queue,
        False once its client went away (the request then leaves, never computed).
        """
        name, cost = model.name, self.cost
        if model.batcher is None:
            # One clock (monotonic) for the queue, the cost meter and the stages: four reads a
            # request. Inline, not a method: this is every unbatched request's path.
            queue, clock = model.queue, time.monotonic
            try:
                slot = queue.enter(deadline, alive=alive)
            except DeadlineExceeded:
                self._expired[name].inc()
                raise
            t0 = slot.started
            work = cost.begin(name, t0)
            try:
                if model.processor is None:  # the engine's tensors are the node's: no stages around it
                    outputs = model.run(inputs)
                    t1, t2 = t0, clock()
                    t3 = t2
                else:
                    engine_inputs, context = model.preprocess(inputs, parameters)
                    t1 = clock()
                    raw = model.run(engine_inputs)
                    t2 = clock()
                    outputs = model.postprocess(raw, context)
                    t3 = clock()
            except BaseException:
                failed = clock()
                cost.end(work, now=failed)
                queue.leave(slot, failed)
                raise
            cost.end(work, now=t3)
            state = queue.leave(slot, t3)
            self._last_done[name] = t3
            stages = Stages(slot.queued_s, t1 - t0, t2 - t1, t3 - t2)
            self._latencies.append((name, t3 - t0))
        else:
            try:
                outputs, stages = self._run_batched(model, inputs, parameters, deadline)
            except DeadlineExceeded:
                self._expired[name].inc()
                raise
            state = self.queue_state(model)
            self._latencies.append((name, stages.compute))
        if requested:
            outputs = _requested(model, outputs, requested)
        return Reply(outputs, stages, cost.energy_j(name), cost.source, state)

    def _run_batched(
        self,
        model: ServedModel,
        inputs: Mapping[str, np.ndarray],
        parameters: Mapping[str, Any],
        deadline: float | None,
    ) -> tuple[dict[str, np.ndarray], Stages]:
        batcher = model.batcher
        assert batcher is not None
        cost = self.cost
        if deadline is not None and deadline <= time.monotonic():
            raise DeadlineExceeded(f"model {model.name!r}: deadline passed before the request started")
        work = cost.begin(model.name)
        try:
            t0 = time.perf_counter()
            engine_inputs, context = model.preprocess(inputs, parameters)
            t1 = time.perf_counter()
        finally:
            cost.end(work, inferences=0)
        timeout = None if deadline is None else deadline - time.monotonic()
        share = batcher.submit(engine_inputs, timeout)
        queued = time.perf_counter() - t1 - share.seconds
        work = cost.begin(model.name)
        try:
            t2 = time.perf_counter()
            outputs = model.postprocess(share.outputs, context)
            t3 = time.perf_counter()
        finally:
            cost.end(work)
        self._last_done[model.name] = time.monotonic()
        return outputs, Stages(max(queued, 0.0), t1 - t0, share.seconds, t3 - t2)

    def flush_metrics(self) -> None:
        """Move the latencies recorded since the last call into the Prometheus histograms."""
        latencies, children = self._latencies, self._latency
        while latencies:
            name, seconds = latencies.popleft()
            children[name].observe(seconds)

    # -------------------------------------------------------------- liveness

    def stalled(self, limit_s: float) -> list[ServedModel]:
        """Served versions whose engine has held one request longer than ``limit_s`` (hung)."""
        hung = []
        for model in self.served():
            batcher = model.batcher
            running = batcher.running_s() if batcher is not None else model.queue.oldest_running_s()
            if running > limit_s:
                hung.append(model)
        return hung

    def idle_models(self, quiet_s: float) -> list[ServedModel]:
        """Ready models that finished no request for ``quiet_s`` and run none now (probe them)."""
        now = time.monotonic()
        return [
            m
            for name, m in list(self.models.items())
            if m.ready
            and now - self._last_done.get(name, now) >= quiet_s
            and self.queue_state(m).depth == 0
            and (m.batcher is None or m.batcher.running_s() == 0.0)
        ]

    def calibrate(self, model: ServedModel, timeout_s: float, runs: int = 3) -> None:
        """Probe an unbatched model ``runs`` times right after loading; its service time starts at
        the median of the runs after the first (which still warms caches up)."""
        times = []
        for _ in range(runs):
            t0 = time.monotonic()
            self.probe(model, timeout_s)
            times.append(time.monotonic() - t0)
        if model.batcher is None and len(times) > 1:
            model.queue.set_service(float(np.median(times[1:])))

    def probe(self, model: ServedModel, timeout_s: float) -> None:
        """Run the model once through its queue (liveness, and the service time Describe reports
        before any request): its processor's sample request through the whole path when it has
        one, else the engine on zeros."""
        deadline = time.monotonic() + timeout_s
        sample = model.processor.sample_inputs() if model.processor is not None else None
        if model.batcher is not None:
            model.batcher.submit(model.zero_inputs(), timeout_s)
        else:
            queue = model.queue
            slot = queue.enter(deadline)
            work = self.cost.begin(model.name)
            try:
                if sample is None:
                    model.run(model.zero_inputs())
                else:  # a whole typical inference: it counts in the energy per inference
                    engine_inputs, context = model.preprocess(sample, {"sensor_id": PROBE_SENSOR})
                    model.postprocess(model.run(engine_inputs), context)
            finally:
                self.cost.end(work, inferences=0 if sample is None else 1)
                queue.leave(slot)
        self._last_done[model.name] = time.monotonic()


def _requested(
    model: ServedModel, outputs: dict[str, np.ndarray], requested: Sequence[str]
) -> dict[str, np.ndarray]:
    chosen = {}
    for name in requested:
        if name not in outputs:
            raise InvalidInput(
                f"output {quote(name)}: model {model.name!r} has no such output; has {sorted(outputs)}",
                reason="unknown_output",
            )
        chosen[name] = outputs[name]
    return chosen
