"""The demo's fleet: which experts the model repository holds, on which nodes they run, and
the config files of the coordinator and the bridge.

:func:`plan_fleet` spreads the experts found in a model repository over two or three nodes
with different thread counts, each expert on two nodes so the coordinator has a choice;
:func:`write_node_repo` gives each node a model repository of its own (links to the weights,
``model.yaml`` with the node's thread count). :func:`fleet_yaml` declares every task with its
gate and validation table (:mod:`moesaic.demo.gates`), so the coordinator selects by MoE².
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import yaml

__all__ = [
    "CAMERA_TASKS",
    "DEMO_TASKS",
    "LIDAR_TASKS",
    "Expert",
    "NodePlan",
    "TaskFiles",
    "find_experts",
    "fleet_yaml",
    "folder_digest",
    "ingest_yaml",
    "plan_fleet",
    "write_node_repo",
]

log = logging.getLogger(__name__)

LIDAR_TASKS = ("bev_segmentation", "bev_reconstruction")
CAMERA_TASKS = ("detection",)
DEMO_TASKS = (*LIDAR_TASKS, *CAMERA_TASKS)


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


@dataclass(frozen=True)
class TaskFiles:
    """A task's trained gate and the validation table it was trained on."""

    gate: Path
    validation: Path


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


def folder_digest(folder: Path) -> str:
    """SHA-256 over a model folder's file names and contents (weights, model.yaml, ...)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        digest.update(b"\0")
    return digest.hexdigest()


def fleet_yaml(nodes: list[NodePlan], metrics_port: int, tasks: Mapping[str, TaskFiles]) -> str:
    """The coordinator's fleet config: the nodes, and each task's gate and validation table."""
    from moesaic.coordinator.config import parse_fleet

    data = {
        # Fusion and the reply take several ms on a loaded 2-core machine: keep them free at the
        # budget's end; re-describe nodes often, so a suspect replica is back within a second.
        "coordinator": {"metrics_port": metrics_port, "overhead_ms": 10.0, "probe_interval_s": 0.5},
        "nodes": [{"address": n.address, "name": n.name} for n in nodes],
        "tasks": {
            task: {"gate": str(files.gate), "validation": str(files.validation)}
            for task, files in sorted(tasks.items())
        },
    }
    parse_fleet(data, source="demo fleet config", env={})  # a mistake here fails now, not in the child
    return yaml.safe_dump(data, sort_keys=False)


def ingest_yaml(lidar_tasks: list[str], camera_tasks: list[str], metrics_port: int) -> str:
    """The bridge's config: LiDAR frames to the LiDAR tasks, camera frames to detection."""
    from moesaic.config import load_settings
    from moesaic.ingest.config import IngestConfig

    data = {
        "component": "ingest",
        "protocol": "3.1.1",
        "metrics_port": metrics_port,
        "request_timeout_s": 5.0,
        "defaults": {
            "lidar": {"tasks": lidar_tasks or [LIDAR_TASKS[0]]},
            "camera": {"tasks": camera_tasks or [CAMERA_TASKS[0]]},
        },
    }
    # a mistake here fails now, not in the child
    load_settings(IngestConfig, role="ingest", data=data, source="demo ingest config", env={})
    return yaml.safe_dump(data, sort_keys=False)
