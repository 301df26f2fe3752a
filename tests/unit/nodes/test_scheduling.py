"""A model's queue: earliest deadline first, expired and cancelled requests never run."""

from __future__ import annotations

import threading
import time

import pytest

from moesaic.errors import Cancelled, DeadlineExceeded
from moesaic.nodes.scheduling import ModelQueue


def _waiter(
    queue: ModelQueue, deadline: float | None, order: list[str], name: str, **kw: object
) -> threading.Thread:
    def run() -> None:
        try:
            slot = queue.enter(deadline, **kw)  # type: ignore[arg-type]
        except (DeadlineExceeded, Cancelled) as exc:
            order.append(f"{name}:{type(exc).__name__}")
            return
        order.append(name)
        queue.leave(slot)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _until_waiting(queue: ModelQueue, n: int) -> None:
    deadline = time.monotonic() + 5
    while queue.state().depth < n and time.monotonic() < deadline:
        time.sleep(0.005)


def test_slots_go_to_the_earliest_deadline_first() -> None:
    queue = ModelQueue("m", slots=1)
    held = queue.enter(None)
    order: list[str] = []
    now = time.monotonic()
    threads = []
    for name, deadline in (("late", now + 30), ("none", None), ("soon", now + 10), ("sooner", now + 5)):
        threads.append(_waiter(queue, deadline, order, name))
        _until_waiting(queue, len(threads) + 1)
    assert queue.state().depth == 5
    queue.leave(held)
    for t in threads:
        t.join(5)
    assert order == ["sooner", "soon", "late", "none"]
    assert queue.state().depth == 0


def test_a_request_whose_deadline_passes_in_the_queue_leaves_and_never_runs() -> None:
    queue = ModelQueue("m", slots=1)
    held = queue.enter(None)
    order: list[str] = []
    t = _waiter(queue, time.monotonic() + 0.05, order, "short")
    t.join(5)
    assert order == ["short:DeadlineExceeded"] and queue.state().depth == 1
    queue.leave(held)
    # The slot it never took is free again: the next request runs at once.
    queue.leave(queue.enter(time.monotonic() + 1))
    with pytest.raises(DeadlineExceeded, match="not computed"):
        queue.enter(time.monotonic() - 0.001)  # already past on arrival


def test_a_request_whose_client_went_away_leaves_the_queue() -> None:
    queue = ModelQueue("m", slots=1)
    queue.poll_s = 0.01
    held = queue.enter(None)
    gone = threading.Event()
    order: list[str] = []
    t = _waiter(queue, None, order, "gone", alive=lambda: not gone.is_set())
    _until_waiting(queue, 2)
    gone.set()
    t.join(5)
    assert order == ["gone:Cancelled"]
    queue.leave(held)
    assert queue.state().depth == 0


def test_expected_wait_follows_the_time_requests_hold_their_slot() -> None:
    queue = ModelQueue("m", slots=2)
    for _ in range(3):
        slot = queue.enter(None)
        queue.leave(slot, slot.started + 0.1)
    held = [queue.enter(None), queue.enter(None)]
    state = queue.state()
    assert state.depth == 2 and state.expected_wait_s == pytest.approx(0.05)  # one ahead, two slots
    for slot in held:
        queue.leave(slot)
    assert queue.state().expected_wait_s == 0.0
    assert queue.oldest_running_s() == 0.0
