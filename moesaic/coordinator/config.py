"""The fleet config: which nodes the coordinator uses and how it selects among their experts.

YAML, validated by pydantic with ``extra="forbid"``; every error names the file and the
field. Relative paths are relative to the config file. Settings under ``coordinator:`` can be
overridden from the environment as ``MOESAIC_COORDINATOR_<FIELD>`` (e.g.
``MOESAIC_COORDINATOR_OVERHEAD_MS=4``, ``MOESAIC_COORDINATOR_TLS__KEY=...``) and from systemd
credentials named like the field (``tls__key``): :func:`moesaic.config.load_settings`::

    coordinator:
      overhead_ms: 3
    nodes:
      - address: 127.0.0.1:8001
        name: jetson-a
        experts:
          - {model: yolo-n, latency_ms: 18, energy_mj: 90}
    tasks:
      detection: {gate: gates/detection.json, validation: tables/detection.npz, max_experts: 3}
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesaic.budget import UNBOUNDED, Budget
from moesaic.config import load_settings, read_yaml_mapping
from moesaic.rpc import TlsConfig

__all__ = [
    "CoordinatorSettings",
    "ExpertOverride",
    "FleetConfig",
    "NodeEntry",
    "TaskSettings",
    "load_fleet",
    "parse_fleet",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CoordinatorSettings(_Strict):
    overhead_ms: float = Field(2.0, ge=0, description="Network round trip + fusion time added to every set.")
    default_budget: Budget = Field(
        default=UNBOUNDED,
        description="Budget of requests that carry none.",
    )
    default_deadline_ms: float = Field(
        10000.0,
        gt=0,
        description="How long a request may take at most when its caller sets no deadline "
        "(failover still runs within it).",
    )
    expert_timeout_ms: float = Field(10000.0, gt=0, description="Longest wait for one expert call.")
    deadline_slack: float = Field(
        3.0,
        ge=1,
        description="An expert is given up after slack x its predicted latency + deadline_margin_ms "
        "(hang detection); a budget's end may stop it earlier.",
    )
    deadline_margin_ms: float = Field(50.0, ge=0, description="Added to every per-expert deadline.")
    max_experts: int = Field(
        0, ge=0, description="Fine level: top-k of the gate within the pool; 0 = no limit."
    )
    ewma_alpha: float = Field(0.2, gt=0, le=1, description="Weight of the newest reply in the live profiles.")
    latency_deviations: float = Field(
        3.0,
        ge=0,
        description="Predicted latency = mean + this many mean absolute deviations of the measured "
        "service time (3: about the 99th percentile of a normal spread, 2: the 95th; 0: the mean).",
    )
    failures_to_down: int = Field(2, ge=1, description="Consecutive failed calls that mark a node down.")
    probe_interval_s: float = Field(
        2.0,
        gt=0,
        description="How often every node's Describe is read again: down nodes come back, "
        "suspect replicas are cleared, queue waits are refreshed.",
    )
    describe_timeout_s: float = Field(3.0, gt=0, description="Timeout of a node's Describe.")
    budget_bucket_ratio: float = Field(
        1.25, gt=1, description="Coarse cache: budgets are rounded down to powers of this ratio."
    )
    profile_drift: float = Field(
        0.25, gt=0, description="Relative profile change that invalidates cached coarse selections."
    )
    default_latency_ms: float = Field(50.0, ge=0, description="Prior latency of an expert with no profile.")
    default_energy_mj: float = Field(0.0, ge=0, description="Prior energy of an expert with no profile.")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics port; 0 = off.")
    max_message_bytes: int = Field(64 << 20, gt=0, description="gRPC message size limit.")
    tls: TlsConfig | None = Field(None, description="Server TLS of the Coordinator service.")


class ExpertOverride(_Strict):
    model: str = Field(min_length=1, description="Model name on the node.")
    task: str | None = Field(None, description="Task override (default: the node's Describe).")
    latency_ms: float | None = Field(None, ge=0, description="Prior latency (default: Describe p50).")
    energy_mj: float | None = Field(None, ge=0, description="Prior energy (default: Describe profile).")
    weight: float = Field(1.0, gt=0, description="Prior gate weight used when the task has no trained gate.")
    enabled: bool = Field(True, description="False keeps the expert out of the pool.")


class NodeEntry(_Strict):
    address: str = Field(min_length=3, description="host:port of the node's gRPC server.")
    name: str | None = Field(None, description="Node name in expert ids (default: Describe node_id).")
    device: str | None = Field(
        None, description="Queue name: experts on one device queue (default: node/device)."
    )
    tls: TlsConfig | None = Field(None, description="Client TLS towards this node.")
    only_listed: bool = Field(False, description="Use only the models listed in `experts`.")
    experts: list[ExpertOverride] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> NodeEntry:
        names = [e.model for e in self.experts]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"model {sorted(dup)[0]!r} listed twice")
        return self


class TaskSettings(_Strict):
    gate: Path | None = Field(None, description="Gate file written by `moesaic train-gate`.")
    validation: Path | None = Field(
        None, description="Validation table (.npz) for the exact coarse selection."
    )
    max_experts: int | None = Field(
        None, ge=1, description="Per-task top-k (default: coordinator.max_experts)."
    )
    input_kind: str | None = Field(
        None, description="Features of a task without a gate: points, image or tensor."
    )
    on_infeasible: Literal["best_effort", "shed"] = Field(
        "best_effort",
        description="When no expert set fits a request's budget: run the cheapest expert anyway "
        "(budget_met=false, reason no_feasible_set) or refuse it (RESOURCE_EXHAUSTED).",
    )


class FleetConfig(_Strict):
    coordinator: CoordinatorSettings = Field(default_factory=lambda: CoordinatorSettings.model_validate({}))
    nodes: list[NodeEntry] = Field(default_factory=list)
    tasks: dict[str, TaskSettings] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _unique_nodes(self) -> FleetConfig:
        addresses = [n.address for n in self.nodes]
        dup = {a for a in addresses if addresses.count(a) > 1}
        if dup:
            raise ValueError(f"node address {sorted(dup)[0]!r} listed twice")
        return self


def parse_fleet(
    data: Any, *, source: str = "fleet config", base: Path | None = None, env: Mapping[str, str] | None = None
) -> FleetConfig:
    """Validate a decoded fleet config with the environment and credentials on top
    (:func:`moesaic.config.load_settings`); errors name ``source`` (or the variable) and the field."""
    config = load_settings(
        FleetConfig,
        role="coordinator",
        data={} if data is None else data,
        source=source,
        env=env,
        env_section="coordinator",
    )
    if base is not None:
        for settings in config.tasks.values():
            for name in ("gate", "validation"):
                path = getattr(settings, name)
                if path is not None and not path.is_absolute():
                    setattr(settings, name, base / path)
    return config


def load_fleet(path: Path, *, env: Mapping[str, str] | None = None) -> FleetConfig:
    """Read a fleet YAML file."""
    return parse_fleet(read_yaml_mapping(path), source=str(path), base=path.parent, env=env)
