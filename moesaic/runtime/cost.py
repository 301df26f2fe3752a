"""One cost meter per device: attributed dynamic energy of every inference.

A :class:`CostMeter` is the only reader of a device's energy source (an
:class:`~moesaic.runtime.energy.EnergyMeter`: NVML, Jetson INA3221, RAPL or an estimate). It
samples the source on a thread of its own every ``interval_s``, learns the device's idle
draw, and splits each interval's **dynamic** energy (the source's delta minus idle power x
time) among the work that ran in it, in proportion to each piece's busy time there. So

    Σ attributed energy + idle x time + foreign = the source's delta   (counters that step
                                                                   coarsely, like NVML's, telescope)

and a request costs the same whether it ran alone or beside others: overlapping work shares
one interval's joules instead of each piece counting them all. Other processes on the same
device (a second node on one GPU, a benchmark) are not this meter's to charge: where the
source tells their share of the device's activity (NVML's per-process utilization), that share
of each interval's dynamic energy is set aside as ``foreign`` and never attributed here, and an
interval in which only they worked is not taken for idle. Nothing on the request path
reads the source: work is registered with :meth:`CostMeter.begin` / :meth:`CostMeter.end`
(a dict entry and a deque append), and a reply's figure comes from :meth:`CostMeter.energy_j`,
the model's attributed joules per completed request over the last few seconds (a request's
own busy time is too noisy on shared CPUs to scale it by).

Idle is learned from stretches of at least ``idle_window_s`` with no work (the interval
right after work is skipped: counters lag), pooled over the last few; until one is seen, the
lowest power of any window of that length stands in (an upper bound: it may hold work). A
fixed ``idle_watts`` skips learning. With an estimate source there is no idle to learn: the
estimate's watts are charged for the time any work runs (the union of busy spans, so overlap
is not counted twice).

>>> from moesaic.runtime.energy import EstimateMeter
>>> with CostMeter(EstimateMeter(20.0), device="cpu", interval_s=0.01) as cost:
...     token = cost.begin("toy")
...     busy = cost.end(token, inferences=1)
...     cost.source
'estimate+attributed'
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from moesaic.runtime.energy import EnergyMeter, EstimateMeter

__all__ = ["CostMeter", "CostSnapshot", "IntervalReport"]

log = logging.getLogger(__name__)

_IDLE_SAMPLES = 16
_DONE_LIMIT = 100_000


@dataclass(frozen=True)
class IntervalReport:
    """What one closed interval added: the source's joules, idle power, joules per model."""

    seconds: float
    device_joules: float
    idle_watts: float
    attributed: Mapping[str, float]
    foreign_joules: float = 0.0
    """Dynamic energy set aside for other processes on the device."""


@dataclass
class CostSnapshot:
    """Totals since the meter started (all joules)."""

    seconds: float = 0.0
    device_joules: float = 0.0
    idle_watts: float = 0.0
    dynamic_joules: float = 0.0
    unattributed_joules: float = 0.0
    attributed: dict[str, float] = field(default_factory=dict)
    busy_seconds: dict[str, float] = field(default_factory=dict)
    foreign_joules: float = 0.0

    @property
    def attributed_joules(self) -> float:
        return sum(self.attributed.values())


class CostMeter:
    """Samples one energy source and attributes dynamic energy to the work that ran."""

    def __init__(
        self,
        source: EnergyMeter,
        *,
        device: str,
        interval_s: float = 0.1,
        idle_watts: float | None = None,
        idle_window_s: float = 1.0,
        memory_s: float = 3.0,
        on_interval: Callable[[IntervalReport], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        own_source: bool = True,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s}")
        self.device = device
        self.meter = source
        self.estimate_watts = source.watts if isinstance(source, EstimateMeter) else None
        self.source = f"{source.source}+attributed"
        self.measured = source.measured
        self.interval_s = interval_s
        self._fixed_idle = idle_watts
        self._idle_window = idle_window_s
        self._memory = memory_s
        self._on_interval = on_interval
        self._clock = clock
        self._own_source = own_source
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._inflight: dict[int, tuple[str, float]] = {}
        self._done: deque[tuple[str, float, float]] = deque()  # model, start, end
        self._completed: deque[tuple[str, float]] = deque()  # model, requests; drained per interval
        # Running joules and completed requests per model (decayed): the figure replies carry.
        self._rate: dict[str, tuple[float, float]] = {}
        self._per_request: dict[str, float] = {}  # the figure, updated while _rate holds >= 1 request
        self._idle_samples: deque[tuple[float, float]] = deque(maxlen=_IDLE_SAMPLES)  # joules, seconds
        self._lowest_window: float | None = None
        self._quiet = (0.0, 0.0)  # joules, seconds of the current stretch without work
        self._window = (0.0, 0.0)  # joules, seconds of the current window (any load)
        self._held: list[tuple[float, float, float, float]] = []  # intervals waiting for an idle figure
        self._share = (0.0, -math.inf)  # other processes' last known share, when it was read
        self._was_busy = True
        self.totals = CostSnapshot(idle_watts=idle_watts or 0.0)
        self._last_time = clock()
        self._last_joules = source.joules()
        self._warned = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"cost-{device}", daemon=True)
        self._thread.start()

    # -------------------------------------------------------------- request side

    def begin(self, model: str, now: float | None = None) -> int:
        """Register work of ``model`` starting now; pass the token to :meth:`end`.

        No lock: a dict store and (in :meth:`end`) a pop and a deque append are atomic in
        CPython, and the sampler thread reads copies.
        """
        token = next(self._ids)
        self._inflight[token] = (model, self._clock() if now is None else now)
        return token

    def end(self, token: int, *, inferences: float = 1.0, now: float | None = None) -> float:
        """The work is over; returns its busy seconds.

        ``inferences``: how many requests this work completes (0 for a part of one, such as a
        batched request's pre-processing, or for a batch whose requests finish later). ``now``
        (begin and end): the caller's reading of the meter's clock, saving a read.
        """
        if now is None:
            now = self._clock()
        model, start = self._inflight.pop(token)
        if len(self._done) < _DONE_LIMIT:
            self._done.append((model, start, now))
        if inferences:
            self._completed.append((model, inferences))
        return now - start

    def energy_j(self, model: str) -> float:
        """Attributed joules of one of ``model``'s requests: its running figure per request.

        The figure is the model's attributed energy over the requests it completed, decayed
        over ``memory_s``: stable per request, while the attribution itself follows busy time.
        It moves only while at least one request's worth of completions is in that memory, so
        an idle gap (which decays the count towards 0 while the next request's joules arrive
        before its completion) leaves the last figure standing. Before the model's first
        figure, the mean of the device's other models' figures stands in (0 before any).

        The figure is never below 0: a GPU that drops to a deeper power state than the one its
        idle was learned in draws less than "idle" while lightly loaded (seen on an H200 serving
        one model a few percent of the time), and a negative charge is no request's cost. The
        totals (:meth:`snapshot`) keep the signed sums, so they still add up to the counter.
        """
        figure = self._per_request.get(model)
        if figure is None:
            figures = list(self._per_request.values())  # one C-level copy: the sampler may add one
            figure = sum(figures) / len(figures) if figures else 0.0
        return max(figure, 0.0)

    @property
    def idle_watts(self) -> float:
        """The idle draw in use now (learned or configured); 0 for an estimate source."""
        if self._fixed_idle is not None:
            return self._fixed_idle
        if self.estimate_watts is not None:
            return 0.0
        if self._idle_samples:
            # Pooled, not a median of window powers: a coarse counter's steps split unevenly
            # between consecutive windows, and pooling lets those errors cancel.
            samples = list(self._idle_samples)
            return sum(j for j, _ in samples) / sum(s for _, s in samples)
        return self._lowest_window if self._lowest_window is not None else math.nan

    def relearn_idle(self) -> None:
        """Forget the idle samples so far (e.g. taken while models were loading, which works
        the device without registering work); the lowest window stands in until new ones."""
        self._idle_samples.clear()
        self._quiet = (0.0, 0.0)
        self._was_busy = True

    def snapshot(self) -> CostSnapshot:
        """A copy of the totals since start."""
        with self._lock:
            t = self.totals
            return CostSnapshot(
                t.seconds,
                t.device_joules,
                t.idle_watts,
                t.dynamic_joules,
                t.unattributed_joules,
                dict(t.attributed),
                dict(t.busy_seconds),
                t.foreign_joules,
            )

    # -------------------------------------------------------------- sampler thread

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def sample(self) -> None:
        """Close the current interval now (the thread calls this every ``interval_s``)."""
        try:
            joules = self.meter.joules()
        except Exception as exc:  # a failing read skips this tick, the next one catches up
            if not self._warned:
                log.warning("cost meter %s: reading %s failed: %s", self.device, self.meter.source, exc)
                self._warned = True
            return
        now = self._clock()
        start, self._last_time = self._last_time, now
        delta, self._last_joules = joules - self._last_joules, joules
        if now > start:
            self._close(start, now, delta, self._foreign_share(now))

    def _foreign_share(self, now: float) -> float:
        """Other processes' share of the interval ending ``now``: the source's figure, else its
        last one for up to a second (per-process samples come less often than intervals), else 0."""
        try:
            share = self.meter.foreign_share()
        except Exception:  # a failing read: as if the source could not tell
            share = None
        if share is not None:
            self._share = (min(max(share, 0.0), 1.0), now)
        last, at = self._share
        return last if now - at <= 1.0 else 0.0

    def _close(self, start: float, end: float, joules: float, foreign: float = 0.0) -> None:
        with self._lock:
            busy = self._busy_in(start, end)
        self._learn_idle(start, end, joules, busy, foreign)
        self._held.append((start, end, joules, foreign))
        idle = self.idle_watts
        if math.isnan(idle):
            return  # no idle figure yet: hold the intervals until there is one
        held, self._held = self._held, []
        completed = self._drain_completed()
        for i, (a, b, j, f) in enumerate(held):
            last = i == len(held) - 1
            with self._lock:
                spans = busy if (a, b) == (start, end) else self._busy_in(a, b)
                report = self._attribute(a, b, j, idle, spans, completed if last else {}, f)
                self._forget_before(b)
            if self._on_interval is not None:
                try:
                    self._on_interval(report)
                except Exception:
                    log.exception("cost meter %s: interval observer failed", self.device)

    def _busy_in(self, a: float, b: float) -> dict[str, list[tuple[float, float]]]:
        """Busy spans of each model inside [a, b] (work still running counts up to b)."""
        spans: dict[str, list[tuple[float, float]]] = {}
        for model, s, e in list(self._done):  # copies: request threads append meanwhile
            if e > a and s < b:
                spans.setdefault(model, []).append((max(s, a), min(e, b)))
        for model, s in list(self._inflight.values()):
            if s < b:
                spans.setdefault(model, []).append((max(s, a), b))
        return spans

    def _drain_completed(self) -> dict[str, float]:
        """Requests completed since the last call, per model (each counted exactly once)."""
        completed: dict[str, float] = {}
        queue = self._completed
        while queue:
            model, n = queue.popleft()
            completed[model] = completed.get(model, 0.0) + n
        return completed

    def _learn_idle(
        self,
        a: float,
        b: float,
        joules: float,
        busy: Mapping[str, list[tuple[float, float]]],
        foreign: float = 0.0,
    ) -> None:
        seconds = b - a
        wj, ws = self._window[0] + joules, self._window[1] + seconds
        if ws >= self._idle_window:
            watts = wj / ws
            self._lowest_window = watts if self._lowest_window is None else min(self._lowest_window, watts)
            wj, ws = 0.0, 0.0
        self._window = (wj, ws)
        if busy or self._was_busy or foreign > 0:  # other processes' work is no idle either
            self._was_busy = bool(busy) or foreign > 0
            self._quiet = (0.0, 0.0)
            return
        qj, qs = self._quiet[0] + joules, self._quiet[1] + seconds
        if qs >= self._idle_window:
            self._idle_samples.append((qj, qs))
            qj, qs = 0.0, 0.0
        self._quiet = (qj, qs)

    def _attribute(
        self,
        a: float,
        b: float,
        joules: float,
        idle: float,
        spans: Mapping[str, list[tuple[float, float]]],
        completed: Mapping[str, float],
        foreign: float = 0.0,
    ) -> IntervalReport:
        seconds = b - a
        busy = {m: sum(e - s for s, e in parts) for m, parts in spans.items()}
        total_busy = sum(busy.values())
        if self.estimate_watts is not None:
            dynamic = self.estimate_watts * _union([p for parts in spans.values() for p in parts])
        else:
            dynamic = joules - idle * seconds
        others = dynamic * foreign
        dynamic -= others
        t = self.totals
        t.foreign_joules += others
        t.seconds += seconds
        t.device_joules += joules
        t.idle_watts = idle
        t.dynamic_joules += dynamic
        attributed: dict[str, float] = {}
        if total_busy <= 0:
            t.unattributed_joules += dynamic
        else:
            for model, b_m in busy.items():
                share = dynamic * b_m / total_busy
                attributed[model] = share
                t.attributed[model] = t.attributed.get(model, 0.0) + share
                t.busy_seconds[model] = t.busy_seconds.get(model, 0.0) + b_m
        d = math.exp(-seconds / self._memory)
        for model in self._rate.keys() | attributed.keys():
            j, n = self._rate.get(model, (0.0, 0.0))
            j, n = j * d + attributed.get(model, 0.0), n * d + completed.get(model, 0.0)
            self._rate[model] = (j, n)
            if n >= 1.0:
                # At least one request's worth of completions in memory: a figure that cannot
                # blow up when the count has decayed over an idle gap while a new request's
                # joules arrive before its completion does.
                self._per_request[model] = j / n
        return IntervalReport(seconds, joules, idle, attributed, others)

    def _forget_before(self, t: float) -> None:
        """Drop finished spans that end before ``t`` (oldest first; appends go on meanwhile)."""
        done = self._done
        while done and done[0][2] <= t:
            done.popleft()

    # -------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Close the last interval, stop the thread, close the source if this meter owns it."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=5)
        self.sample()
        if self._own_source:
            self.meter.close()

    def __enter__(self) -> CostMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _union(spans: list[tuple[float, float]]) -> float:
    """Length of the union of ``spans``."""
    total, reach = 0.0, -math.inf
    for s, e in sorted(spans):
        if e <= reach:
            continue
        total += e - max(s, reach)
        reach = e
    return total
