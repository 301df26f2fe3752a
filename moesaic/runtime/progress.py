"""A progress bar with an ETA for long commands (training), on stderr.

On a terminal it is a live bar (rich); in a log (not a terminal) it prints a line at every
tenth of the work, so ``journalctl`` or CI output still shows how far it got and how long is
left::

    with TrainingProgress("train detector", total=epochs * batches) as bar:
        for ...:
            bar.advance(note=f"epoch 3/10 loss 1.234")

    train detector  40% 120/300  epoch 4/10 loss 1.234  elapsed 0:01:10  ETA 0:01:45
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

__all__ = ["TrainingProgress", "format_seconds"]


def format_seconds(seconds: float) -> str:
    """``0:01:45`` (hours:minutes:seconds)."""
    s = max(round(seconds), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class TrainingProgress:
    """``total`` units of work (steps, batches); :meth:`advance` after each one."""

    def __init__(
        self, label: str, total: int, *, stream: IO[str] | None = None, live: bool | None = None
    ) -> None:
        self.label = label
        self.total = max(int(total), 1)
        self.done = 0
        self.note = ""
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self._started = time.monotonic()
        self._next_line = 0.1
        self._shown = -1  # work done at the last line printed
        self._first: tuple[float, int] | None = None  # (time, work done) at the first advance
        self._bar: Any = None
        self._task: Any = None

    def __enter__(self) -> TrainingProgress:
        self._started = time.monotonic()
        if self.live:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[note]}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=Console(file=self.stream),
            )
            self._bar.__enter__()
            self._task = self._bar.add_task(self.label, total=self.total, note="")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.__exit__(*exc)
            self._bar = None
        elif self.done != self._shown:
            self._line()  # where it stopped (an early end, an error)

    def eta_s(self) -> float:
        """Seconds left at the pace since the first unit (set-up time before it, such as loading
        data, does not count); the pace from the start until a second unit is done."""
        if self.done == 0:
            return float("inf")
        now = time.monotonic()
        if self._first is not None and self.done > self._first[1]:
            at, done = self._first
            return (now - at) / (self.done - done) * (self.total - self.done)
        return (now - self._started) / self.done * (self.total - self.done)

    def advance(self, units: int = 1, *, note: str = "") -> None:
        self.done = min(self.done + units, self.total)
        if self._first is None:
            self._first = (time.monotonic(), self.done)
        self.note = note or self.note
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, note=self.note)
        elif self.done / self.total >= self._next_line or self.done == self.total:
            self._line()
            while self._next_line <= self.done / self.total:
                self._next_line += 0.1

    def _line(self) -> None:
        self._shown = self.done
        elapsed = time.monotonic() - self._started
        eta = self.eta_s()
        left = format_seconds(eta) if eta != float("inf") else "?"
        share = 100 * self.done // self.total
        note = f"  {self.note}" if self.note else ""
        print(
            f"{self.label} {share:3d}% {self.done}/{self.total}{note}  "
            f"elapsed {format_seconds(elapsed)}  ETA {left}",
            file=self.stream,
            flush=True,
        )
