"""Dynamic batching: requests that arrive close together run as one engine call.

Declared per model folder in ``model.yaml``::

    dynamic_batching:
      max_batch_size: 8            # most rows (sum of first dimensions) in one engine call
      max_queue_delay_us: 2000     # how long the oldest queued request waits for company
      preferred_batch_sizes: [4, 8]   # sent at once when the queue can form one

The node serves requests on a thread pool and each request thread calls
:meth:`DynamicBatcher.submit`, which queues the request and blocks until its share of a batch
is back. One batcher thread per model forms batches under a condition variable: requests whose
inputs agree in names, dtypes and every dimension but the first are concatenated along
dimension 0 (in arrival order), run in one engine call and split back by rows. Each request
gets the batch's time and energy in proportion to its rows.

Work in flight is tracked by id: a failed batch fails every member (with an
:class:`~moesaic.runtime.engine.EngineError` naming the batch), a request whose deadline
passes while it is still queued is taken out and gets
:class:`~moesaic.errors.DeadlineExceeded` (the most urgent group is batched first),
:meth:`DynamicBatcher.drain` sends whatever is queued without waiting out the delay
(SIGTERM), and if the batcher thread ever dies every request it holds fails instead of hanging.

>>> batcher = DynamicBatcher("double", lambda x: {"y": x["x"] * 2}, DynamicBatchingConfig())
>>> share = batcher.submit({"x": np.ones((1, 2), np.float32)}, timeout=1.0)
>>> share.outputs["y"].tolist(), share.batch_rows
([[2.0, 2.0]], 1)
>>> batcher.close()
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesaic.errors import DeadlineExceeded, Unavailable
from moesaic.runtime.cost import CostMeter
from moesaic.runtime.engine import EngineDescription, EngineError, dtype_of

__all__ = ["BatchShare", "DynamicBatcher", "DynamicBatchingConfig", "check_batchable", "zero_inputs"]

log = logging.getLogger(__name__)

Tensors = dict[str, np.ndarray]
RunBatch = Callable[[Mapping[str, np.ndarray]], Tensors]


class DynamicBatchingConfig(BaseModel):
    """``dynamic_batching:`` section of a model.yaml."""

    model_config = ConfigDict(extra="forbid")

    max_batch_size: int = Field(
        8,
        ge=1,
        description="Most rows (the sum of the merged requests' first dimensions) one engine call "
        "runs; a request with more rows runs alone.",
    )
    max_queue_delay_us: int = Field(
        2000,
        ge=0,
        le=60_000_000,
        description="Microseconds the oldest queued request waits for others to join its batch; "
        "0 = send whatever is queued at once.",
    )
    preferred_batch_sizes: list[int] = Field(
        default_factory=list,
        description="Batch sizes (rows) sent as soon as the queue can form one, without waiting "
        "out the delay; the largest one that can be formed wins.",
    )

    @model_validator(mode="after")
    def _preferred(self) -> DynamicBatchingConfig:
        bad = [n for n in self.preferred_batch_sizes if not 1 <= n <= self.max_batch_size]
        if bad:
            raise ValueError(
                f"preferred_batch_sizes: {bad} outside 1..max_batch_size ({self.max_batch_size})"
            )
        self.preferred_batch_sizes = sorted(set(self.preferred_batch_sizes))
        return self


@dataclass(frozen=True)
class BatchShare:
    """One request's part of a batch: its output rows and its share of the batch's engine time
    (its energy is the cost meter's business)."""

    outputs: Tensors
    seconds: float
    batch_rows: int
    batch_requests: int


def check_batchable(description: EngineDescription, run: RunBatch, where: str) -> None:
    """Raise ``ValueError`` (prefixed with ``where``) unless the engine batches along dimension 0.

    Every input and output needs a dynamic first dimension, and a probe on zero inputs of
    batch 1 and 2 must give outputs of 1 and 2 rows.
    """
    for kind, specs in (("input", description.inputs), ("output", description.outputs)):
        for spec in specs:
            if not spec.shape or spec.shape[0] != -1:
                raise ValueError(
                    f"{where}: engine {kind} {spec.name!r} has shape {list(spec.shape)}; "
                    "dynamic batching needs a dynamic first (batch) dimension on every input and output"
                )
    for rows in (1, 2):
        feed = zero_inputs(description, rows)
        try:
            outputs = run(feed)
        except Exception as exc:
            raise ValueError(f"{where}: the engine failed a probe with batch {rows}: {exc}") from None
        for name, array in outputs.items():
            if array.ndim == 0 or array.shape[0] != rows:
                raise ValueError(
                    f"{where}: engine output {name!r} has shape {list(array.shape)} for an input "
                    f"batch of {rows}; dynamic batching needs outputs whose first dimension is the batch"
                )


def zero_inputs(description: EngineDescription, rows: int = 1) -> Tensors:
    """Zeros for every engine input, ``rows`` along the first dimension (other dynamic dims 1)."""
    feed: Tensors = {}
    for spec in description.inputs:
        dims = [d if d >= 0 else 1 for d in spec.shape]
        if dims:
            dims[0] = rows if spec.shape[0] < 0 else dims[0]
        if spec.datatype == "BYTES":
            feed[spec.name] = np.full(dims, b"", dtype=object)
        else:
            feed[spec.name] = np.zeros(dims, dtype_of(spec.datatype))
    return feed


class _Pending:
    """One queued request, tracked by id until its batch answers."""

    __slots__ = ("deadline", "done", "enqueued", "error", "id", "inputs", "key", "result", "rows", "state")

    def __init__(self, ident: int, inputs: Mapping[str, np.ndarray], deadline: float | None) -> None:
        self.id = ident
        self.inputs = inputs
        self.enqueued = time.monotonic()
        self.deadline = deadline
        self.rows, self.key = _batch_key(ident, inputs)
        self.state = "queued"  # -> running -> done
        self.done = threading.Event()
        self.result: BatchShare | None = None
        self.error: BaseException | None = None

    def finish(self, result: BatchShare | None = None, error: BaseException | None = None) -> None:
        self.result, self.error, self.state = result, error, "done"
        self.done.set()


def _batch_key(ident: int, inputs: Mapping[str, np.ndarray]) -> tuple[int, tuple[Any, ...]]:
    """(rows, key): requests merge only when their keys are equal."""
    arrays = list(inputs.values())
    if not arrays or any(a.ndim == 0 for a in arrays):
        return 1, ("alone", ident)
    rows = arrays[0].shape[0]
    if any(a.shape[0] != rows for a in arrays):
        return rows, ("alone", ident)
    return rows, tuple((name, a.dtype.str, a.shape[1:]) for name, a in sorted(inputs.items()))


class DynamicBatcher:
    """Merges concurrent requests of one model into engine calls on one thread of its own."""

    def __init__(
        self,
        name: str,
        run: RunBatch,
        config: DynamicBatchingConfig,
        *,
        cost: CostMeter | None = None,
        on_batch: Callable[[int, int], None] | None = None,
    ) -> None:
        self.name = name
        self.config = config
        self._run = run
        self._cost = cost
        self._batch_s = 0.0  # running mean of an engine call, for the expected wait
        self._running_since: float | None = None
        self._on_batch = on_batch
        self._delay = config.max_queue_delay_us / 1e6
        self._preferred = frozenset(config.preferred_batch_sizes)
        self._cond = threading.Condition()
        self._queue: deque[_Pending] = deque()
        self._inflight: dict[int, _Pending] = {}
        self._ids = itertools.count(1)
        self._closed = False
        self._flush = False
        self._dead: BaseException | None = None
        self.engine_calls = 0
        self._thread = threading.Thread(target=self._loop, name=f"batcher-{name}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- request side

    def submit(self, inputs: Mapping[str, np.ndarray], timeout: float | None = None) -> BatchShare:
        """Queue ``inputs`` and block until their rows of a batch are back.

        ``timeout`` (seconds) is the request's remaining deadline: if it passes while the request
        is still queued, the request leaves the queue and ``DeadlineExceeded`` is raised. A request
        already running waits for its batch to end.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            if self._closed or self._dead is not None:
                reason = "stopping" if self._closed else f"batcher failed: {self._dead}"
                raise Unavailable(f"model {self.name!r}: {reason}")
            pending = _Pending(next(self._ids), inputs, deadline)
            self._queue.append(pending)
            self._inflight[pending.id] = pending
            self._cond.notify()
        if not pending.done.wait(timeout):
            with self._cond:
                if pending.state == "queued":
                    self._queue.remove(pending)
                    self._inflight.pop(pending.id, None)
                    pending.finish(error=self._expired(pending))
            pending.done.wait()
        if pending.error is not None:
            raise pending.error
        assert pending.result is not None
        return pending.result

    def _expired(self, pending: _Pending) -> DeadlineExceeded:
        waited = (time.monotonic() - pending.enqueued) * 1e3
        return DeadlineExceeded(
            f"model {self.name!r}: deadline passed after {waited:.1f} ms in the batch queue"
        )

    def queued(self) -> int:
        """Requests waiting in the queue now."""
        with self._cond:
            return len(self._queue)

    def running_s(self) -> float:
        """Seconds the engine call in progress has run (0 when none runs)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    @property
    def batch_s(self) -> float:
        """Running mean of one engine call (one batch), seconds; 0 before any ran."""
        return self._batch_s

    def expected_wait_s(self) -> float:
        """Seconds a request arriving now should wait before its batch runs (a rough figure:
        the batches ahead of it at the running mean engine time, plus the gathering delay)."""
        with self._cond:
            rows = sum(p.rows for p in self._queue)
        batches = -(-rows // self.config.max_batch_size)
        return batches * self._batch_s + (self._delay if rows < self.config.max_batch_size else 0.0)

    # -------------------------------------------------------------- lifecycle

    def drain(self) -> None:
        """From now on send queued requests at once, without waiting out the delay."""
        with self._cond:
            self._flush = True
            self._cond.notify()

    def close(self, timeout: float = 30.0) -> None:
        """Run what is queued, refuse new requests, stop the thread. Idempotent."""
        with self._cond:
            self._closed = self._flush = True
            self._cond.notify()
        self._thread.join(timeout)
        with self._cond:  # the thread is stuck in the engine past ``timeout``: fail the rest
            self._fail_all(Unavailable(f"model {self.name!r}: stopped"))

    # -------------------------------------------------------------- batcher thread

    def _loop(self) -> None:
        try:
            while True:
                batch = self._next_batch()
                if batch is None:
                    return
                self._execute(batch)
        except BaseException as exc:  # never leave a request hanging
            log.exception("batcher of model %s died", self.name)
            with self._cond:
                self._dead = exc
                self._fail_all(EngineError(f"model {self.name!r}: batcher failed: {exc}"))

    def _fail_all(self, error: BaseException) -> None:
        for pending in list(self._inflight.values()):
            pending.finish(error=error)
        self._inflight.clear()
        self._queue.clear()

    def _next_batch(self) -> list[_Pending] | None:
        """Wait until a batch is due, take it out of the queue; None once closed and empty."""
        cond = self._cond
        with cond:
            while True:
                now = time.monotonic()
                self._drop_expired(now)
                if not self._queue:
                    if self._closed:
                        return None
                    cond.wait()
                    continue
                batch, wake = self._pick(now)
                if batch:
                    for pending in batch:
                        self._queue.remove(pending)
                        pending.state = "running"
                    return batch
                cond.wait(max(wake - now, 0.0))

    def _drop_expired(self, now: float) -> None:
        for pending in [p for p in self._queue if p.deadline is not None and p.deadline <= now]:
            self._queue.remove(pending)
            self._inflight.pop(pending.id, None)
            pending.finish(error=self._expired(pending))

    def _pick(self, now: float) -> tuple[list[_Pending], float]:
        """The first batch that is due, the group of the earliest deadline first (then the
        oldest); else ([], when the next one is due).

        A group is the queued requests of one key (names, dtypes, non-batch dimensions), so a
        request of another shape never waits behind a group that is still gathering.
        """
        seen: set[tuple[Any, ...]] = set()
        wake = float("inf")
        for head in sorted(self._queue, key=_urgency):
            if head.key in seen:
                continue
            seen.add(head.key)
            members, rows = self._compatible(head)
            take = self._due(members, rows, now)
            if take:
                return members[:take], now
            wake = min(wake, min(p.enqueued for p in members) + self._delay)
        return [], wake

    def _compatible(self, head: _Pending) -> tuple[list[_Pending], int]:
        """``head`` (the most urgent of its key) and, in arrival order, the others that fit its batch."""
        members, rows = [head], head.rows
        limit = self.config.max_batch_size
        for pending in self._queue:
            if rows >= limit:
                break
            if pending is not head and pending.key == head.key and rows + pending.rows <= limit:
                members.append(pending)
                rows += pending.rows
        return members, rows

    def _due(self, members: list[_Pending], rows: int, now: float) -> int:
        """How many of ``members`` to send now (0 = keep waiting)."""
        if rows >= self.config.max_batch_size or self._flush:
            return len(members)
        if self._preferred:
            total, best = 0, 0
            for i, pending in enumerate(members, 1):
                total += pending.rows
                if total in self._preferred:
                    best = i
            if best:
                return best
        if now >= min(p.enqueued for p in members) + self._delay:
            return len(members)
        return 0

    def _execute(self, batch: list[_Pending]) -> None:
        rows = [p.rows for p in batch]
        total = sum(rows)
        cost = self._cost
        try:
            inputs = batch[0].inputs if len(batch) == 1 else _concatenate(batch)
            work = cost.begin(self.name) if cost else None
            start = self._running_since = time.monotonic()
            try:
                outputs = self._run(inputs)
            finally:
                self._running_since = None
                # its requests complete in their own threads (post-processing)
                seconds = (
                    cost.end(work, inferences=0) if cost and work is not None else time.monotonic() - start
                )
            self.engine_calls += 1
            self._batch_s = seconds if self.engine_calls == 1 else 0.8 * self._batch_s + 0.2 * seconds
            if len(batch) > 1:
                for name, array in outputs.items():
                    if array.ndim == 0 or array.shape[0] != total:
                        raise EngineError(
                            f"output {name!r} has shape {list(array.shape)} for a batch of {total} rows; "
                            "cannot split it back per request"
                        )
        except Exception as exc:
            self._fail(batch, total, exc)
            return
        if self._on_batch is not None:
            try:
                self._on_batch(total, len(batch))
            except Exception:
                log.exception("batch observer of model %s failed", self.name)
        offset = 0
        for pending, n in zip(batch, rows, strict=True):
            part = (
                outputs
                if len(batch) == 1
                else {name: array[offset : offset + n] for name, array in outputs.items()}
            )
            offset += n
            share = n / total if total else 1.0 / len(batch)
            self._finish(pending, BatchShare(part, seconds * share, total, len(batch)))

    def _fail(self, batch: list[_Pending], total: int, exc: Exception) -> None:
        if len(batch) == 1:
            self._finish(batch[0], error=exc)  # alone: the same error as without batching
            return
        log.error("model %s: batch of %d requests (%d rows) failed: %s", self.name, len(batch), total, exc)
        message = f"model {self.name!r}: batch of {len(batch)} requests ({total} rows) failed: {exc}"
        for pending in batch:
            self._finish(pending, error=EngineError(message))

    def _finish(
        self, pending: _Pending, result: BatchShare | None = None, error: BaseException | None = None
    ) -> None:
        with self._cond:
            self._inflight.pop(pending.id, None)
        pending.finish(result, error)


def _urgency(pending: _Pending) -> tuple[float, float]:
    return (pending.deadline if pending.deadline is not None else float("inf"), pending.enqueued)


def _concatenate(batch: list[_Pending]) -> Tensors:
    first = batch[0].inputs
    return {name: np.concatenate([p.inputs[name] for p in batch]) for name in first}
