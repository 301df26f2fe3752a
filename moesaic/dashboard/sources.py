"""Where the dashboard's state comes from: the MQTT topics, node Describe, metrics, health.

Each source is an async loop that runs until cancelled, never raises out (a failure is shown
as the source's state: a node ``down``, a metrics endpoint ``up: false``, the broker
disconnected) and retries with backoff. Every await has a timeout.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import aiomqtt
from aiomqtt.exceptions import MqttConnectError

from moesaic.dashboard.config import DashboardConfig, MetricsEndpoint, NodeTarget
from moesaic.dashboard.state import FleetState
from moesaic.ingest.mqtt import connect_options
from moesaic.ingest.topics import monitor_subscriptions
from moesaic.rpc import TlsConfig

__all__ = ["MqttFeed", "describe_json", "poll_coordinator", "poll_metrics", "poll_node", "summarise_metrics"]

log = logging.getLogger(__name__)
_TIMEOUT_S = 5.0


class MqttFeed:
    """Subscribes to results, PNGs, statuses, errors (and camera frames) and feeds the state."""

    def __init__(self, config: DashboardConfig, state: FleetState) -> None:
        self.config = config
        self.state = state
        self.connected = asyncio.Event()
        self.mqtt = config.mqtt_config()
        self._client_id = f"moesaic-dashboard-{socket.gethostname()}-{uuid.uuid4().hex[:8]}"[:64]

    def _report(self, **fields: Any) -> None:
        self.state.update_component(
            "broker", now=time.time(), kind="broker", url=self.config.mqtt.broker, **fields
        )

    async def run(self) -> None:
        """Connect, subscribe, feed; reconnect with exponential backoff until cancelled."""
        delay = 0.2
        while True:
            try:
                await self._session()
                delay = 0.2
            except aiomqtt.MqttError as exc:
                self.connected.clear()
                self._report(health="down", error=str(exc)[:300])
                log.warning(
                    "dashboard: broker %s: %s; retrying in %.1fs", self.config.mqtt.broker, exc, delay
                )
            await asyncio.sleep(delay * (0.8 + 0.4 * random.random()))
            delay = min(delay * 2, 10.0)

    async def _session(self) -> None:
        protocols = {
            "5": [aiomqtt.ProtocolVersion.V5],
            "3.1.1": [aiomqtt.ProtocolVersion.V311],
            "auto": [aiomqtt.ProtocolVersion.V5, aiomqtt.ProtocolVersion.V311],
        }[self.config.mqtt.protocol]
        for i, protocol in enumerate(protocols):
            client = aiomqtt.Client(
                **connect_options(self.mqtt, client_id=self._client_id, protocol=protocol)
            )
            try:
                await client.__aenter__()
            except MqttConnectError:
                if i + 1 < len(protocols):
                    continue
                raise
            break
        try:
            for topic_filter in monitor_subscriptions(camera_frames=self.config.camera_frames):
                qos = 0 if "/sensors/" in topic_filter else 1
                await client.subscribe(topic_filter, qos=qos, timeout=_TIMEOUT_S)
            self.connected.set()
            self._report(health="serving", error="")
            log.info("dashboard: subscribed to %s", self.config.mqtt.broker)
            async for message in client.messages:
                payload = message.payload
                data = payload if isinstance(payload, bytes) else str(payload or "").encode()
                self.state.on_message(str(message.topic), data, now=time.time())
        finally:
            self.connected.clear()
            with contextlib.suppress(aiomqtt.MqttError, asyncio.CancelledError, OSError, TimeoutError):
                await asyncio.wait_for(client.__aexit__(None, None, None), timeout=_TIMEOUT_S)


def describe_json(description: Any) -> dict[str, Any]:
    """A ``moesaic.v1.NodeDescription`` as the page shows it."""
    device = description.device
    return {
        "node_id": description.node_id,
        "version": description.version,
        "device": {
            "kind": device.kind,
            "name": device.name,
            "id": device.id,
            "memory_bytes": int(device.memory_bytes),
            "cores": int(device.cores),
            "energy_source": device.energy_source,
            "idle_watts": float(device.idle_watts),
            "power_limit_watts": float(device.power_limit_watts),
        },
        "models": [
            {
                "name": m.name,
                "task": m.task,
                "engine": m.engine,
                "device": m.device,
                "provider": m.provider,
                "ready": bool(m.ready),
                "state": m.state,
                "error": m.error[:300],
                "queue_depth": int(m.queue_depth),
                "expected_wait_ms": float(m.expected_wait_ms),
                "service_ms": float(getattr(m, "service_ms", 0.0)),
            }
            for m in description.models
        ],
    }


async def poll_node(target: NodeTarget, state: FleetState, *, interval_s: float) -> None:
    """Describe ``target`` every ``interval_s``; a failure marks it down (with the reason)."""
    from moesaic.nodes.client import NodeClient

    name = target.name
    async with NodeClient(target.address, tls=target.tls) as node:
        while True:
            try:
                described = describe_json(await node.describe(timeout=min(interval_s, _TIMEOUT_S)))
                name = name or described["node_id"] or None
                state.update_node(
                    target.address, name=name, address=target.address, description=described, now=time.time()
                )
            except Exception as exc:  # an unreachable node is shown down, never raised
                details = getattr(exc, "details", None)
                reason = (details() if callable(details) else None) or str(exc) or type(exc).__name__
                state.update_node(
                    target.address, name=name, address=target.address, error=reason, now=time.time()
                )
            await asyncio.sleep(interval_s)


def summarise_metrics(text: str) -> dict[str, Any]:
    """What the page shows of a component's Prometheus text: which component, its models
    (``moesaic_model_info``), the experts up and a few counters. ``ValueError`` when unparsable."""
    from prometheus_client.parser import text_string_to_metric_families

    component = ""
    models: list[dict[str, str]] = []
    experts_up: dict[str, bool] = {}
    counters = {
        "selections": 0.0,
        "budget_violations": 0.0,
        "mqtt_errors": 0.0,
        "frames_dropped": 0.0,
        "frames_missing": 0.0,
        "requests_expired": 0.0,
        "requests_shed": 0.0,
    }
    names = {
        "moesaic_selections_total": "selections",
        "moesaic_budget_violations_total": "budget_violations",
        "moesaic_mqtt_errors_total": "mqtt_errors",
        "moesaic_mqtt_frames_dropped_total": "frames_dropped",
        "moesaic_mqtt_frames_missing_total": "frames_missing",
        "moesaic_requests_expired_total": "requests_expired",
        "moesaic_requests_shed_total": "requests_shed",
    }
    violations: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels, value = sample.labels, sample.value
            if sample.name == "moesaic_up" and value:
                component = labels.get("component", "")
            elif sample.name == "moesaic_model_info" and value:
                models.append(
                    {k: labels.get(k, "") for k in ("model", "version", "engine", "device", "provider")}
                )
            elif sample.name == "moesaic_experts_up":
                experts_up[labels.get("expert", "")] = bool(value)
            elif sample.name in names:
                counters[names[sample.name]] += value
                if sample.name == "moesaic_budget_violations_total":
                    why = labels.get("reason") or labels.get("kind", "")
                    key = f"{labels.get('task', '')} {why}".strip()
                    violations[key] = violations.get(key, 0.0) + value
    return {
        "component": component,
        "models": models,
        "experts_up": experts_up,
        "counters": counters,
        "violations": violations,
    }


async def poll_metrics(endpoint: MetricsEndpoint, state: FleetState, *, interval_s: float) -> None:
    """Scrape ``endpoint`` every ``interval_s``; nodes' models also go to their node."""
    import aiohttp

    name = endpoint.label
    timeout = aiohttp.ClientTimeout(total=min(interval_s * 2, _TIMEOUT_S))
    async with aiohttp.ClientSession(timeout=timeout) as session:
        while True:
            try:
                async with session.get(endpoint.url) as response:
                    response.raise_for_status()
                    body = await response.text()
                summary = summarise_metrics(body)
            except (aiohttp.ClientError, TimeoutError, ValueError, UnicodeDecodeError) as exc:
                state.update_component(
                    name, now=time.time(), metrics_url=endpoint.url, metrics_up=False, error=str(exc)[:300]
                )
            else:
                state.update_component(
                    name,
                    now=time.time(),
                    kind=summary["component"],
                    metrics_url=endpoint.url,
                    metrics_up=True,
                    error="",
                    counters=summary["counters"],
                    violations=summary["violations"],
                    experts_up=summary["experts_up"],
                )
                if summary["component"] == "node":
                    state.node_metrics(name, summary["models"], now=time.time())
            await asyncio.sleep(interval_s)


async def poll_coordinator(
    address: str, state: FleetState, *, interval_s: float, tls: TlsConfig | None = None
) -> None:
    """The coordinator's ``grpc.health.v1`` status every ``interval_s``."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from moesaic.rpc import create_channel

    names = {v: k.lower() for k, v in health_pb2.HealthCheckResponse.ServingStatus.items()}
    async with create_channel(address, tls=tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=_TIMEOUT_S)
                health, error = names.get(reply.status, "unknown"), ""
            except grpc.aio.AioRpcError as exc:
                health, error = "down", (exc.details() or exc.code().name)[:300]
            state.update_component(
                "coordinator",
                now=time.time(),
                kind="coordinator",
                address=address,
                health=health,
                error=error,
            )
            await asyncio.sleep(interval_s)


async def forever(name: str, loop: Callable[[], Awaitable[None]]) -> None:
    """Run a source; one that ends with an unexpected error is logged and started again."""
    while True:
        try:
            await loop()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("dashboard source %s failed; restarting it in 2 s", name)
        await asyncio.sleep(2.0)
