"""Prometheus metrics of nodes, coordinators and bridges.

Each component builds its own :class:`Metrics` (own registry, nothing global changes at
import) and serves it with :meth:`Metrics.serve`::

    metrics = Metrics(component="node")
    metrics.expert_latency.labels(expert="n0/yolo").observe(0.012)
    metrics.serve(port=9100)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = ["Metrics"]

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Metrics:
    """Every moesaic metric, registered in a registry of this component's own."""

    component: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.expert_latency = Histogram(
            "moesaic_expert_latency_seconds",
            "Latency of one expert call (node: model compute; coordinator: round trip).",
            ["expert"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.energy = Counter(
            "moesaic_energy_joules",
            "Energy spent by expert calls; source is 'measured' or 'estimate' (one word for it everywhere).",
            ["expert", "source"],
            registry=r,
        )
        self.batch_rows = Histogram(
            "moesaic_batch_rows",
            "Rows (sum of first dimensions) per engine call of a dynamically batched model.",
            ["expert"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.batch_requests = Histogram(
            "moesaic_batch_requests",
            "Requests merged into one engine call of a dynamically batched model.",
            ["expert"],
            buckets=_BATCH_BUCKETS,
            registry=r,
        )
        self.requests_expired = Counter(
            "moesaic_requests_expired",
            "Requests whose deadline passed before their work started (never computed).",
            ["model"],
            registry=r,
        )
        self.device_energy = Counter(
            "moesaic_device_energy_joules",
            "The device's energy as its source counts it (idle included).",
            ["device"],
            registry=r,
        )
        self.device_idle_watts = Gauge(
            "moesaic_device_idle_watts",
            "The device's idle draw in use for attribution.",
            ["device"],
            registry=r,
        )
        self.model_energy = Counter(
            "moesaic_model_energy_joules",
            "Dynamic energy attributed to a model's work (device energy above idle, split by busy time).",
            ["model", "device"],
            registry=r,
        )
        self.model_info = Gauge(
            "moesaic_model_info",
            "1 for each loaded model: where it really runs (device) and through what (engine, provider).",
            ["model", "version", "engine", "device", "provider"],
            registry=r,
        )
        self.model_loads = Counter(
            "moesaic_model_loads",
            "Model version loads (start, RepositoryModelLoad, --watch) by result: ok or failed; "
            "a failed load leaves the version serving before it in place.",
            ["model", "version", "result"],
            registry=r,
        )
        self.requests = Counter(
            "moesaic_requests", "Requests handled, by gRPC status code.", ["method", "code"], registry=r
        )
        self.selections = Counter(
            "moesaic_selections", "Times the coordinator selected an expert.", ["task", "expert"], registry=r
        )
        self.budget_violations = Counter(
            "moesaic_budget_violations",
            "Results that did not meet their budget, by reason: 'no_feasible_set', 'expert_failed', "
            "'deadline_missed' or 'energy_over'.",
            ["task", "reason"],
            registry=r,
        )
        self.requests_shed = Counter(
            "moesaic_requests_shed",
            "Requests refused because no expert set fitted their budget (task policy 'shed').",
            ["task"],
            registry=r,
        )
        self.prediction_error = Histogram(
            "moesaic_prediction_error_ratio",
            "Measured / predicted cost of a request's expert set; kind is 'latency' or 'energy'.",
            ["task", "kind"],
            buckets=(0.25, 0.5, 0.67, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0),
            registry=r,
        )
        self.frames_dropped = Counter(
            "moesaic_mqtt_frames_dropped",
            "Sensor frames the bridge accepted but dropped; reason 'queue_full' = evicted by a newer "
            "frame from the latest-frame queue.",
            ["sensor", "reason"],
            registry=r,
        )
        self.frames_missing = Counter(
            "moesaic_mqtt_frames_missing",
            "Sensor frames that never reached the bridge: gaps in the frame_id of a sensor's frames.",
            ["sensor"],
            registry=r,
        )
        self.mqtt_errors = Counter(
            "moesaic_mqtt_errors",
            "Malformed MQTT payloads and publish failures.",
            ["sensor", "reason"],
            registry=r,
        )
        self.experts_up = Gauge(
            "moesaic_experts_up",
            "1 while an expert is in the selection pool, 0 when down.",
            ["expert"],
            registry=r,
        )
        self.info = Gauge("moesaic_up", "1 while this component runs.", ["component"], registry=r)
        self.info.labels(component=self.component).set(1)

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve ``/metrics`` over HTTP on ``host:port`` from a daemon thread.

        Returns the HTTP server; ``shutdown()`` and ``server_close()`` stop it and free the port.
        """
        server, _ = start_http_server(port, addr=host, registry=self.registry)
        return server
