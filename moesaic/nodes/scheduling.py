"""Each model's queue: a fixed number of requests run at once, the rest wait earliest deadline first.

A request calls :meth:`ModelQueue.enter` with its deadline (monotonic seconds, or None) and
gets a :class:`Slot` when one frees up; the slot is handed straight to the waiting request
with the earliest deadline (ties: first come). A request whose deadline passes while it waits
leaves the queue with :class:`~moesaic.errors.DeadlineExceeded` and is never computed; one
whose client went away (``alive()`` says False) leaves with :class:`~moesaic.errors.Cancelled`.
A request that finds a free slot takes it with one lock and no allocation besides its slot.
:meth:`ModelQueue.state` says how deep the queue is and how long a request arriving now should
expect to wait, from the running mean time a
request holds its slot.

>>> queue = ModelQueue("toy", slots=1)
>>> slot = queue.enter(deadline=None)
>>> queue.state().depth
1
>>> queue.leave(slot).depth
0
"""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from moesaic.errors import Cancelled, DeadlineExceeded

__all__ = ["ModelQueue", "QueueState", "Slot"]


@dataclass(slots=True)
class QueueState:
    """Requests running or waiting, and the expected wait of a request arriving now."""

    depth: int
    expected_wait_s: float
    service_s: float = 0.0
    """Running mean of the time one request (or batch) holds the engine; 0 before any ran."""


class Ticket:
    """A waiting request's place in the queue; :meth:`cancel` takes it out."""

    __slots__ = ("cancelled", "deadline", "event", "granted", "seq")

    def __init__(self, deadline: float | None, seq: int) -> None:
        self.deadline = deadline
        self.seq = seq
        self.event = threading.Event()
        self.granted = False
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True
        self.event.set()

    def __lt__(self, other: Ticket) -> bool:
        mine = self.deadline if self.deadline is not None else float("inf")
        theirs = other.deadline if other.deadline is not None else float("inf")
        return (mine, self.seq) < (theirs, other.seq)


class Slot:
    """A running request: when it started and how long it waited. Pass it to
    :meth:`ModelQueue.leave` when the work is over."""

    __slots__ = ("id", "queued_s", "started")

    def __init__(self, ident: int, started: float, queued_s: float) -> None:
        self.id = ident
        self.started = started
        self.queued_s = queued_s


class ModelQueue:
    """``slots`` requests of one model run at once; the others wait, earliest deadline first."""

    poll_s = 0.05
    """How often a waiting request checks that its client is still there."""

    def __init__(self, name: str, *, slots: int = 1) -> None:
        if slots < 1:
            raise ValueError(f"slots: must be >= 1, got {slots}")
        self.name = name
        self.slots = slots
        self._lock = threading.Lock()
        self._free = slots
        self._waiting: list[Ticket] = []
        self._seq = itertools.count()
        self._running: dict[int, float] = {}  # slot id -> start, for the hang check
        self._service_s = 0.0  # running mean of the time a request holds its slot
        self._served = 0

    def enter(self, deadline: float | None = None, *, alive: Callable[[], bool] | None = None) -> Slot:
        """Wait for a slot; :class:`DeadlineExceeded` if ``deadline`` passes first.

        ``alive`` (optional) is asked every ``poll_s`` while the request waits: once it says
        False (the client went away) the request leaves with :class:`Cancelled`.
        """
        arrived = time.monotonic()
        if deadline is not None and deadline <= arrived:
            raise self._expired(0.0)
        with self._lock:
            if self._free and not self._waiting:
                self._free -= 1
                slot = Slot(next(self._seq), arrived, 0.0)
                self._running[slot.id] = arrived
                return slot
            ticket = Ticket(deadline, next(self._seq))
            heapq.heappush(self._waiting, ticket)
        while not ticket.event.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            wait = self.poll_s if left is None else min(left, self.poll_s)
            if ticket.event.wait(wait if alive is not None else left):
                break
            if alive is not None and not alive():
                ticket.cancel()
        with self._lock:
            now = time.monotonic()
            waited = now - arrived
            if ticket.granted:
                if not ticket.cancelled and (deadline is None or now < deadline):
                    return self._start(now, waited)
                self._hand_over()  # the slot it was given goes to the next request
            else:
                self._waiting.remove(ticket)
                heapq.heapify(self._waiting)
        if ticket.cancelled:
            raise Cancelled(f"model {self.name!r}: the client cancelled the request")
        raise self._expired(waited)

    def _start(self, now: float, queued_s: float) -> Slot:
        slot = Slot(next(self._seq), now, queued_s)
        self._running[slot.id] = now
        return slot

    def leave(self, slot: Slot, now: float | None = None) -> QueueState:
        """The slot's work is over (``now``: its end, monotonic, when the caller has it); returns
        the queue's state it leaves behind (as :meth:`state`, read under the same lock)."""
        held = (time.monotonic() if now is None else now) - slot.started
        with self._lock:
            self._running.pop(slot.id, None)
            served = self._served = self._served + 1
            service = self._service_s = held if served == 1 else 0.8 * self._service_s + 0.2 * held
            waiting = self._waiting
            if waiting:
                self._hand_over()
            else:
                self._free += 1
            depth = len(self._running) + len(waiting)
        slots = self.slots
        return QueueState(depth, max(depth - slots + 1, 0) * service / slots, service)

    def _hand_over(self) -> None:
        """Give a free slot to the most urgent waiting request (lock held)."""
        while self._waiting:
            ticket = heapq.heappop(self._waiting)
            if ticket.cancelled:
                continue
            ticket.granted = True
            ticket.event.set()
            return
        self._free += 1

    def _expired(self, waited: float) -> DeadlineExceeded:
        return DeadlineExceeded(
            f"model {self.name!r}: deadline passed after {waited * 1e3:.1f} ms in the queue; not computed",
            reason="expired_in_queue",
        )

    def set_service(self, seconds: float) -> None:
        """Start the running mean of the service time at ``seconds`` (a calibration)."""
        with self._lock:
            self._service_s, self._served = seconds, max(self._served, 1)

    def state(self) -> QueueState:
        """Depth (running + waiting) and the wait a request arriving now should expect."""
        running, waiting = len(self._running), len(self._waiting)  # len() needs no lock
        ahead = running + waiting - self.slots + 1
        return QueueState(running + waiting, max(ahead, 0) * self._service_s / self.slots, self._service_s)

    def oldest_running_s(self) -> float:
        """Seconds the longest-running request has held its slot (0 when none runs)."""
        with self._lock:
            starts = list(self._running.values())
        return time.monotonic() - min(starts) if starts else 0.0
