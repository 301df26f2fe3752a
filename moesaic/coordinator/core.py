"""The transport-neutral coordinator: registry + planner + the Perceive pipeline.

:class:`Coordinator` is what the gRPC service (and the MQTT bridge, in-process) calls::

    async with Coordinator(load_fleet(Path("fleet.yaml"))) as coordinator:
        perception = await coordinator.perceive(PerceiveInput(task="detection", inputs=...,
                                                              budget=Budget(latency_ms=80)))

How one request runs is :mod:`moesaic.coordinator.pipeline`; how experts are called,
given up and replaced is :mod:`moesaic.coordinator.dispatch`.
"""

from __future__ import annotations

from collections.abc import Mapping

from moesaic.coordinator import fusion
from moesaic.coordinator.calls import Run
from moesaic.coordinator.config import FleetConfig
from moesaic.coordinator.pipeline import PerceiveInput, Perception, Pipeline
from moesaic.coordinator.planner import Planner, TaskModel, load_task_models
from moesaic.coordinator.registry import Registry
from moesaic.metrics import Metrics

__all__ = ["Coordinator", "PerceiveInput", "Perception", "Run"]


class Coordinator:
    """Registry + planner + pipeline; an async context manager."""

    def __init__(
        self,
        config: FleetConfig,
        *,
        metrics: Metrics | None = None,
        task_models: Mapping[str, TaskModel] | None = None,
    ) -> None:
        self.config = config
        self.settings = config.coordinator
        self.metrics = metrics
        self.registry = Registry(config, metrics=metrics)
        models = dict(task_models) if task_models is not None else load_task_models(config.tasks)
        self.planner = Planner(self.settings, models)
        shed = frozenset(t for t, s in config.tasks.items() if s.on_infeasible == "shed")
        self.pipeline = Pipeline(self.settings, self.registry, self.planner, metrics=metrics, shed_tasks=shed)

    async def __aenter__(self) -> Coordinator:
        await self.registry.start()
        if "detection" in self.registry.tasks():
            fusion.warm_up()  # the first detection request must not pay for importing it
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.registry.close()

    async def perceive(self, request: PerceiveInput) -> Perception:
        """Run one request through the pipeline (see :meth:`Pipeline.perceive`)."""
        return await self.pipeline.perceive(request)
