"""systemd's notify protocol (sd_notify) without libsystemd: READY, STOPPING, STATUS, WATCHDOG.

Every long-running moesaic service calls :func:`notify_ready` once its models are loaded and
keeps a :class:`Watchdog` fed from its serving loop. Outside systemd (no ``$NOTIFY_SOCKET``)
every call is a no-op that returns False.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import Callable

__all__ = ["Watchdog", "notify", "notify_ready", "notify_status", "notify_stopping", "watchdog_interval"]


def notify(state: str) -> bool:
    """Send one datagram to ``$NOTIFY_SOCKET``; True when sent."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # abstract namespace
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.sendto(state.encode(), address)
        except OSError:
            return False
    return True


def notify_ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else ""))


def notify_stopping() -> bool:
    return notify("STOPPING=1")


def notify_status(status: str) -> bool:
    return notify(f"STATUS={status}")


def watchdog_interval() -> float | None:
    """Seconds between pings systemd expects (half of WatchdogSec), or None when off."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec) / 2e6, 0.01)
    except ValueError:
        return None


class Watchdog:
    """Feeds systemd's watchdog from the event loop it runs on, so a stuck loop stops the pings.

    ``healthy`` (optional) is asked before every ping: while it says False the pings stop,
    and systemd restarts the service once ``WatchdogSec`` passes (a node uses this for a hung
    engine, which the event loop alone would never notice).

    >>> async def serve():
    ...     async with Watchdog(healthy=lambda: True):
    ...         ...  # serve until stopped
    """

    def __init__(self, interval: float | None = None, *, healthy: Callable[[], bool] | None = None) -> None:
        self.interval = interval if interval is not None else watchdog_interval()
        self.healthy = healthy
        self._task: asyncio.Task[None] | None = None

    async def _run(self, interval: float) -> None:
        while True:
            if self.healthy is None or self.healthy():
                notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def __aenter__(self) -> Watchdog:
        if self.interval:
            self._task = asyncio.create_task(self._run(self.interval))
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
