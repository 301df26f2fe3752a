"""The demo's process tree: broker, nodes, coordinator and bridge as child processes.

:class:`ProcessTree` starts every child in a session of its own with a parent-death signal,
so stopping the demo (normally, on Ctrl-C, or when it is killed) leaves nothing behind:
:meth:`ProcessTree.stop` sends SIGTERM to each child's process group, then SIGKILL.
:func:`plan_fleet` spreads the experts found in a model repository over two or three nodes
with different thread counts, each expert on two nodes so the coordinator has a choice.
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

import yaml

__all__ = ["DEMO_TASKS", "Expert", "NodePlan", "ProcessTree", "find_experts", "plan_fleet", "write_node_repo"]

log = logging.getLogger(__name__)

DEMO_TASKS = ("bev_segmentation", "bev_reconstruction", "detection")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Expert:
    """A model folder of the repository and the task it serves."""

    name: str
    task: str
    folder: Path


@dataclass
class NodePlan:
    """One demo node: its name, ONNX Runtime threads and the experts it serves."""

    name: str
    threads: int
    experts: list[Expert] = field(default_factory=list)
    port: int = 0
    metrics_port: int = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def find_experts(models: Path) -> list[Expert]:
    """Model folders under ``models`` whose ``model.yaml`` names a demo task, sorted by name."""
    experts: list[Expert] = []
    if not models.is_dir():
        return experts
    for folder in sorted(p for p in models.iterdir() if p.is_dir() and (p / "model.yaml").is_file()):
        try:
            spec = yaml.safe_load((folder / "model.yaml").read_text()) or {}
        except yaml.YAMLError:
            log.warning("skipping %s: model.yaml is not valid YAML", folder)
            continue
        task = spec.get("task", "") if isinstance(spec, dict) else ""
        if task in DEMO_TASKS:
            experts.append(Expert(str(spec.get("name") or folder.name), task, folder.resolve()))
    return experts


def plan_fleet(experts: list[Expert], *, max_nodes: int = 3) -> list[NodePlan]:
    """Two or three nodes (1, 2, 1 threads); every expert on two of them, tasks spread apart."""
    count = 2 if len(experts) <= 1 else min(max_nodes, 3)
    nodes = [NodePlan(f"edge-{chr(ord('a') + i)}", threads=2 if i == 1 else 1) for i in range(count)]
    for i, expert in enumerate(experts):
        for j in range(min(2, count)):
            nodes[(i + j) % count].experts.append(expert)
    return [n for n in nodes if n.experts]


def write_node_repo(node: NodePlan, root: Path) -> Path:
    """A model repository for ``node``: links to each expert's files, model.yaml with its threads."""
    repo = root / node.name
    repo.mkdir(parents=True, exist_ok=True)
    for expert in node.experts:
        folder = repo / expert.folder.name
        folder.mkdir(exist_ok=True)
        for item in expert.folder.iterdir():
            if item.name != "model.yaml":
                with contextlib.suppress(FileExistsError):
                    (folder / item.name).symlink_to(item)
        spec = yaml.safe_load((expert.folder / "model.yaml").read_text()) or {}
        engine = dict(spec.get("engine") or {"type": "onnxruntime"})
        if engine.get("type", "onnxruntime") == "onnxruntime":
            engine.update(intra_op_threads=node.threads, inter_op_threads=1)
        spec["engine"] = engine
        (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return repo


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
    """Children of the demo, each in its own process group; all stopped by :meth:`stop`."""

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
        """SIGTERM every child's process group (bridge first, broker last), SIGKILL after ``timeout``."""
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
