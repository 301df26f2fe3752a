"""The cost meter: attribution adds up, overlap is not counted twice, coarse counters telescope."""

from __future__ import annotations

import math

import pytest

from moesaic.runtime.cost import CostMeter
from moesaic.runtime.energy import EnergyMeter, EstimateMeter


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class SteppingCounter(EnergyMeter):
    """An energy counter like NVML's: power = idle + watts per running job, but the counter
    only moves every ``step_s`` (it reports the energy as of its last update)."""

    source = "nvml"
    measured = True

    def __init__(self, clock: Clock, idle_w: float, job_w: float, step_s: float = 0.1) -> None:
        self.clock, self.idle_w, self.job_w, self.step_s = clock, idle_w, job_w, step_s
        self.running = 0
        self.exact = 0.0  # true joules so far
        self.reported = 0.0  # what the counter shows: ``exact`` at its last update
        self.since_update = 0.0

    def advance(self, seconds: float) -> None:
        self.exact += (self.idle_w + self.job_w * self.running) * seconds
        self.clock.t += seconds
        self.since_update += seconds
        if self.since_update >= self.step_s - 1e-9:
            self.reported, self.since_update = self.exact, 0.0

    def joules(self) -> float:
        return self.reported


def _drive(
    meter: CostMeter, counter: SteppingCounter, jobs: int, seconds: float, job_s: float
) -> list[float]:
    """Run ``jobs`` overlapping jobs back to back for ``seconds``; sample every 0.05 s."""
    busy: list[float] = []
    t_end = counter.clock.t + seconds
    tick = 0.0
    while counter.clock.t < t_end - 1e-9:
        works = [meter.begin("m") for _ in range(jobs)]
        counter.running = jobs
        elapsed = 0.0
        while elapsed < job_s - 1e-9:
            dt = min(0.01, job_s - elapsed)
            counter.advance(dt)
            elapsed += dt
            tick += dt
            if tick >= 0.05 - 1e-9:
                meter.sample()
                tick = 0.0
        counter.running = 0
        busy += [meter.end(w) for w in works]
    return busy


def _idle(meter: CostMeter, counter: SteppingCounter, seconds: float) -> None:
    for _ in range(round(seconds / 0.05)):
        counter.advance(0.05)
        meter.sample()


@pytest.fixture
def rig() -> tuple[CostMeter, SteppingCounter]:
    clock = Clock()
    counter = SteppingCounter(clock, idle_w=60.0, job_w=100.0)
    meter = CostMeter(counter, device="gpu0", interval_s=3600, clock=clock, idle_window_s=0.5)
    return meter, counter


def test_attributed_energy_adds_up_to_the_counter_minus_idle(rig: tuple[CostMeter, SteppingCounter]) -> None:
    meter, counter = rig
    _idle(meter, counter, 2.0)
    assert meter.idle_watts == pytest.approx(60.0, rel=0.05)
    before = meter.snapshot()
    _drive(meter, counter, jobs=1, seconds=10.0, job_s=0.03)
    _drive(meter, counter, jobs=4, seconds=10.0, job_s=0.03)
    after = meter.snapshot()
    device = after.device_joules - before.device_joules
    seconds = after.seconds - before.seconds
    dynamic = device - 60.0 * seconds
    attributed = after.attributed_joules - before.attributed_joules
    assert attributed == pytest.approx(dynamic, rel=0.10)


def test_per_request_energy_is_the_same_alone_and_beside_others(
    rig: tuple[CostMeter, SteppingCounter],
) -> None:
    meter, counter = rig
    _idle(meter, counter, 2.0)
    means = {}
    cvs = {}
    for jobs in (1, 4):
        _drive(meter, counter, jobs=jobs, seconds=3.0, job_s=0.03)  # let the running rate settle
        busy = _drive(meter, counter, jobs=jobs, seconds=6.0, job_s=0.03)
        figures = [meter.energy_j("m") for _ in busy]
        mean = sum(figures) / len(figures)
        cvs[jobs] = math.sqrt(sum((f - mean) ** 2 for f in figures) / len(figures)) / mean
        means[jobs] = mean
    # 100 W per running job for 30 ms = 3 J per request, whatever runs beside it.
    assert means[1] == pytest.approx(3.0, rel=0.15)
    assert means[4] == pytest.approx(means[1], rel=0.15)
    assert cvs[1] <= 0.25 and cvs[4] <= 0.25


def test_no_idle_figure_holds_attribution_until_one_is_seen() -> None:
    clock = Clock()
    counter = SteppingCounter(clock, idle_w=50.0, job_w=0.0)
    meter = CostMeter(counter, device="gpu0", interval_s=3600, clock=clock, idle_window_s=1.0)
    _idle(meter, counter, 0.5)
    assert math.isnan(meter.idle_watts) and meter.snapshot().seconds == 0.0
    _idle(meter, counter, 1.0)
    snap = meter.snapshot()
    assert snap.seconds == pytest.approx(1.5) and snap.idle_watts == pytest.approx(50.0, rel=0.05)


def test_estimate_source_charges_the_union_of_busy_time() -> None:
    clock = Clock()
    meter = CostMeter(EstimateMeter(20.0, clock=clock), device="cpu", interval_s=3600, clock=clock)
    assert meter.source == "estimate+attributed" and meter.idle_watts == 0.0
    works = [meter.begin("a"), meter.begin("b")]
    clock.t += 0.5
    for w in works:
        meter.end(w)
    clock.t += 0.5
    meter.sample()
    snap = meter.snapshot()
    # 0.5 s of busy device at 20 W = 10 J, split between the two overlapping pieces.
    assert snap.attributed == pytest.approx({"a": 5.0, "b": 5.0})
    assert meter.energy_j("a") == pytest.approx(5.0)


def test_failed_reads_skip_a_tick_and_the_next_catches_up() -> None:
    clock = Clock()
    counter = SteppingCounter(clock, idle_w=10.0, job_w=0.0, step_s=1e-9)
    meter = CostMeter(counter, device="gpu0", interval_s=3600, clock=clock, idle_watts=10.0)
    real = counter.joules
    counter.joules = lambda: (_ for _ in ()).throw(OSError("gone"))  # type: ignore[method-assign]
    counter.advance(1.0)
    meter.sample()
    counter.joules = real  # type: ignore[method-assign]
    counter.advance(1.0)
    meter.sample()
    assert meter.snapshot().device_joules == pytest.approx(20.0)


def test_the_per_request_figure_survives_an_idle_gap_and_a_request_spanning_intervals() -> None:
    """After a long idle gap the decayed request count is ~0; a new request's joules arrive
    interval by interval before its completion does: the figure must stay one request's worth."""
    clock = Clock()
    meter = CostMeter(
        EstimateMeter(10.0, clock=clock), device="cpu", interval_s=3600, clock=clock, memory_s=3.0
    )
    work = meter.begin("m")
    clock.t += 0.3  # one 0.3 s request at 10 W: 3 J
    meter.end(work)
    meter.sample()
    assert meter.energy_j("m") == pytest.approx(3.0)
    clock.t += 60.0  # idle: the running count decays to e^-20
    meter.sample()
    work = meter.begin("m")
    for _ in range(3):  # the next request runs over three intervals
        clock.t += 0.1
        meter.sample()
        assert meter.energy_j("m") == pytest.approx(3.0, rel=0.05)
    meter.end(work)
    clock.t += 0.01
    meter.sample()
    assert 2.5 < meter.energy_j("m") < 6.5  # the completed request counted: about one request's joules


class ProcessView(EnergyMeter):
    """One process's view of a :class:`SteppingCounter` shared by several processes on one
    device: the same counter, and (like NVML's per-process utilization) the share of the device's
    busy time since the last call that the *other* processes caused."""

    source = "nvml"
    measured = True

    def __init__(self, counter: SteppingCounter) -> None:
        self.counter = counter
        self.mine = 0.0
        self.others = 0.0

    def joules(self) -> float:
        return self.counter.reported

    def foreign_share(self) -> float | None:
        total = self.mine + self.others
        share = None if total == 0 else self.others / total
        self.mine = self.others = 0.0
        return share


def _two_processes(
    meters: tuple[CostMeter, CostMeter],
    views: tuple[ProcessView, ProcessView],
    counter: SteppingCounter,
    running: tuple[bool, bool],
    seconds: float,
    job_s: float = 0.03,
) -> list[int]:
    """Each process in ``running`` runs one job at a time back to back; both meters sample
    every 0.05 s. Returns the requests each process completed."""
    done = [0, 0]
    elapsed = tick = 0.0
    while elapsed < seconds - 1e-9:
        works = [meters[p].begin("m") if running[p] else None for p in (0, 1)]
        counter.running = sum(running)
        spent = 0.0
        while spent < job_s - 1e-9:
            counter.advance(0.01)
            for p in (0, 1):
                if running[p]:
                    views[p].mine += 0.01
                    views[1 - p].others += 0.01
            spent += 0.01
            tick += 0.01
            if tick >= 0.05 - 1e-9:
                for meter in meters:
                    meter.sample()
                tick = 0.0
        counter.running = 0
        for p in (0, 1):
            work = works[p]
            if work is not None:
                meters[p].end(work)
                done[p] += 1
        elapsed += job_s
    return done


def test_other_processes_on_the_device_are_neither_charged_nor_taken_for_idle() -> None:
    clock = Clock()
    counter = SteppingCounter(clock, idle_w=60.0, job_w=100.0)
    views = (ProcessView(counter), ProcessView(counter))
    meters = tuple(
        CostMeter(v, device="gpu0", interval_s=3600, clock=clock, idle_window_s=0.5) for v in views
    )
    a, b = meters
    _two_processes(meters, views, counter, (False, False), 2.0)
    assert a.idle_watts == pytest.approx(60.0, rel=0.05)

    # B works alone: A charges nothing to its models and does not learn B's draw as idle.
    before_a, before_b = a.snapshot(), b.snapshot()
    _two_processes(meters, views, counter, (False, True), 5.0)
    assert a.snapshot().attributed_joules - before_a.attributed_joules == pytest.approx(0.0, abs=1.0)
    assert a.idle_watts == pytest.approx(60.0, rel=0.05)
    dynamic_b = b.snapshot().attributed_joules - before_b.attributed_joules
    assert dynamic_b == pytest.approx(100.0 * 5.0, rel=0.10)  # all of B's work is B's

    # Both work at once: together they charge the device's dynamic energy once, not twice.
    snaps = [m.snapshot() for m in meters]
    done = _two_processes(meters, views, counter, (True, True), 6.0)
    after = [m.snapshot() for m in meters]
    device = after[0].device_joules - snaps[0].device_joules
    dynamic = device - 60.0 * (after[0].seconds - snaps[0].seconds)
    charged = [after[p].attributed_joules - snaps[p].attributed_joules for p in (0, 1)]
    assert sum(charged) == pytest.approx(dynamic, rel=0.10)
    for p in (0, 1):
        assert charged[p] / done[p] == pytest.approx(3.0, rel=0.15)  # 100 W x 30 ms a request
        assert meters[p].energy_j("m") == pytest.approx(3.0, rel=0.15)


def test_without_a_foreign_share_a_second_process_is_counted_twice() -> None:
    """The failure the foreign share prevents, shown on the same rig with a source that cannot
    tell processes apart: each meter charges the whole device's dynamic energy."""
    clock = Clock()
    counter = SteppingCounter(clock, idle_w=60.0, job_w=100.0)
    views = (ProcessView(counter), ProcessView(counter))
    for view in views:
        view.foreign_share = lambda: None  # type: ignore[method-assign]
    meters = tuple(
        CostMeter(v, device="gpu0", interval_s=3600, clock=clock, idle_window_s=0.5) for v in views
    )
    _two_processes(meters, views, counter, (False, False), 2.0)
    snaps = [m.snapshot() for m in meters]
    _two_processes(meters, views, counter, (True, True), 6.0)
    after = [m.snapshot() for m in meters]
    dynamic = (after[0].device_joules - snaps[0].device_joules) - 60.0 * (after[0].seconds - snaps[0].seconds)
    charged = sum(after[p].attributed_joules - snaps[p].attributed_joules for p in (0, 1))
    assert charged == pytest.approx(2 * dynamic, rel=0.10)


def test_a_device_below_its_learnt_idle_charges_nothing_and_totals_keep_the_sign(
    rig: tuple[CostMeter, SteppingCounter],
) -> None:
    """An H200 learns idle at one power state, then idles deeper between light requests: the
    interval's dynamic energy is negative. A request is charged 0, not a negative figure; the
    totals keep the signed sum, so they still add up to the counter."""
    meter, counter = rig
    _idle(meter, counter, 2.0)
    assert meter.idle_watts == pytest.approx(60.0, rel=0.05)
    counter.idle_w, counter.job_w = 40.0, 5.0  # deeper idle: busy draw 45 W < the learnt 60 W
    _drive(meter, counter, jobs=1, seconds=2.0, job_s=0.1)
    _idle(meter, counter, 0.2)
    snap = meter.snapshot()
    assert snap.attributed["m"] < 0
    assert meter.energy_j("m") == 0.0
