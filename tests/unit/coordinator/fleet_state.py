"""Registries with replicas set by hand (no network): the unit tests' fleet."""

from __future__ import annotations

from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.profiles import Profile
from moesaic.coordinator.registry import Registry, Replica


def registry_of(
    replicas: dict[str, tuple[float, float]], *, task: str = "classification", **settings: object
) -> Registry:
    """``{"node/model": (service ms, energy mJ)}`` on nodes that are up, one device per node."""
    nodes = sorted({rid.split("/")[0] for rid in replicas})
    config = parse_fleet(
        {
            "coordinator": settings,
            "nodes": [{"address": f"127.0.0.1:{7000 + i}", "name": n} for i, n in enumerate(nodes)],
        },
        env={},
    )
    registry = Registry(config)
    by_name = {n.name: n for n in registry.nodes}
    for rid, (service, energy) in replicas.items():
        node, model = rid.split("/")
        by_name[node].replicas[model] = Replica(
            node,
            model,
            task,
            f"{node}/cpu",
            Profile(service, 0.0, energy, drift=registry.settings.profile_drift),
        )
        by_name[node].up = True
    return registry
