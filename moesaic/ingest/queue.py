"""Per-stream latest-frame queues: a slow consumer drops the oldest frame, never builds a backlog."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["LatestQueue"]

T = TypeVar("T")


class LatestQueue(Generic[T]):
    """Holds at most ``depth`` unprocessed items; :meth:`put` evicts the oldest when full.

    >>> q: LatestQueue[int] = LatestQueue(depth=1)
    >>> q.put(1), q.put(2), q.dropped
    (None, 1, 1)
    """

    def __init__(self, depth: int = 1, on_drop: Callable[[T], None] | None = None) -> None:
        if depth < 1:
            raise ValueError(f"queue depth must be >= 1, got {depth}")
        self._items: deque[T] = deque()
        self._depth = depth
        self._ready = asyncio.Event()
        self._on_drop = on_drop
        self.dropped = 0

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: T) -> T | None:
        """Enqueue ``item``; return the item evicted to make room, if any."""
        evicted = None
        if len(self._items) >= self._depth:
            evicted = self._items.popleft()
            self.dropped += 1
            if self._on_drop is not None:
                self._on_drop(evicted)
        self._items.append(item)
        self._ready.set()
        return evicted

    async def get(self) -> T:
        """The oldest kept item, waiting for one."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        return self._items.popleft()
