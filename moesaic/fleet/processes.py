"""A tree of child processes (broker, nodes, coordinator, bridge) that never outlives its parent.

:class:`ProcessTree` starts every child in a session of its own with a parent-death signal,
so stopping its owner (normally, on Ctrl-C, or when it is killed) leaves nothing behind:
:meth:`ProcessTree.stop` sends SIGTERM to each child's process group, then SIGKILL.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = ["Child", "ProcessTree"]

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    os.setsid()
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]
    args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    restarts: int = 0


class ProcessTree:
    """Child processes, each in its own process group; all stopped by :meth:`stop`."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.children: list[Child] = []

    def spawn(
        self, name: str, args: list[str], *, env: dict[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m <args>`` (or a moesaic sub-command) logging to ``log_dir/name.log``."""
        log_path = self.log_dir / f"{name}.log"
        log_file = log_path.open("ab")  # a restarted child appends to its log
        child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        process = subprocess.Popen(
            [sys.executable, "-m", *args],
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=child_env,
            preexec_fn=_child_setup if sys.platform == "linux" else None,
            start_new_session=sys.platform != "linux",
        )
        self.children.append(Child(name, process, log_path, log_file, list(args), dict(env or {})))
        return process

    def restart(self, child: Child) -> Child:
        """Start ``child`` again with its arguments (its log continues); returns the new one."""
        child.log_file.close()
        self.children.remove(child)
        self.spawn(child.name, child.args, env=child.env)
        fresh = self.children[-1]
        fresh.restarts = child.restarts + 1
        return fresh

    def failed(self) -> Child | None:
        """A child that already exited, if any."""
        return next((c for c in self.children if c.process.poll() is not None), None)

    def tail(self, child: Child, lines: int = 15) -> str:
        """The last lines of a child's log."""
        try:
            return "\n".join(child.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every child's process group, newest first, SIGKILL after ``timeout``."""
        for child in reversed(self.children):
            _signal_group(child.process, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in reversed(self.children):
            try:
                child.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", child.name, timeout)
            _signal_group(child.process, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=5)
            child.log_file.close()
        self.children.clear()

    def __enter__(self) -> ProcessTree:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)
