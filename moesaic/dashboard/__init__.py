"""The live fleet dashboard: a web page of nodes, decisions, budgets, BEV images and detections.

``moesaic dashboard --broker mqtt://127.0.0.1:1883`` serves it; from code (the demo does)::

    from moesaic.dashboard import fleet_dashboard

    async with fleet_dashboard(
        "127.0.0.1:8321",
        broker="mqtt://127.0.0.1:1883",
        coordinator="127.0.0.1:8500",
        nodes={"edge-a": "127.0.0.1:8001"},
        metrics={"edge-a": "http://127.0.0.1:9100/metrics"},
    ) as dashboard:
        print(dashboard.url)
        await stop.wait()

Sources known only later (the demo starts the dashboard before its fleet) are added while it
runs: ``dashboard.add_node(address, name=...)``, ``dashboard.add_metrics(url, name=...)``,
``dashboard.add_coordinator(address)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moesaic.dashboard.config import (
    DashboardConfig,
    MetricsEndpoint,
    NodeTarget,
    load_dashboard_config,
)
from moesaic.dashboard.state import FleetState

if TYPE_CHECKING:
    from moesaic.dashboard.server import Dashboard

__all__ = [
    "Dashboard",
    "DashboardConfig",
    "FleetState",
    "MetricsEndpoint",
    "NodeTarget",
    "fleet_dashboard",
    "load_dashboard_config",
]


def __getattr__(name: str) -> Any:
    """``Dashboard`` on first use: the web server's aiohttp (the ``dashboard`` extra) is not
    imported with the package, so ``moesaic --help`` works on a host without it."""
    if name == "Dashboard":
        from moesaic.dashboard.server import Dashboard

        return Dashboard
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def fleet_dashboard(
    listen: str = "127.0.0.1:8321",
    *,
    broker: str,
    coordinator: str | None = None,
    nodes: Mapping[str, str] | None = None,
    metrics: Mapping[str, str] | None = None,
    protocol: str = "auto",
    **options: Any,
) -> Dashboard:
    """A :class:`Dashboard` (enter it with ``async with``) of a fleet given by addresses:
    ``nodes`` maps node names to gRPC ``HOST:PORT``, ``metrics`` component names to
    Prometheus URLs. ``options`` are further :class:`DashboardConfig` fields (``tls``, ...)."""
    from moesaic.dashboard.server import Dashboard

    config = DashboardConfig.model_validate(
        {
            "listen": listen,
            "mqtt": {"broker": broker, "protocol": protocol},
            "coordinator": coordinator,
            "nodes": [{"name": name, "address": address} for name, address in (nodes or {}).items()],
            "metrics": [{"name": name, "url": url} for name, url in (metrics or {}).items()],
            **options,
        }
    )
    return Dashboard(config)
