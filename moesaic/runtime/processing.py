"""Pre- and post-processing around an engine, declared per model folder.

A model folder's ``model.yaml`` may name a processor::

    processor:
      type: ppn_bev            # registered by moesaic.models.ppn
      frames: 16

The node then exposes the processor's inputs and outputs (e.g. raw LiDAR points in, BEV
class probabilities out) instead of the engine's, and runs
``postprocess(engine.infer(preprocess(inputs)))`` for every request. A processor may keep
soft per-stream state (a temporal ring buffer keyed by the request's ``sensor_id``
parameter); losing it only degrades the first frames of a stream.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.runtime.engine import TensorSpec

__all__ = ["Processor", "create_processor", "processor_types", "register_processor"]


class Processor(ABC):
    """Turns node-level tensors into engine tensors and back.

    Raise ``ValueError`` naming the tensor and what was expected for bad input; the node
    maps it to INVALID_ARGUMENT.
    """

    def __init__(self, options: Mapping[str, Any], model_dir: Path) -> None:
        self.options = dict(options)
        self.model_dir = model_dir

    @abstractmethod
    def inputs(self, engine_inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        """Inputs the node advertises, given the engine's."""

    @abstractmethod
    def outputs(self, engine_outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        """Outputs the node advertises, given the engine's."""

    @abstractmethod
    def preprocess(
        self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], Any]:
        """Engine inputs plus a context object handed to :meth:`postprocess`."""

    @abstractmethod
    def postprocess(self, outputs: Mapping[str, np.ndarray], context: Any) -> dict[str, np.ndarray]:
        """Node-level outputs from the engine's outputs."""

    def class_names(self) -> list[str]:
        """Class names (index = class id) for detectors and segmenters; empty otherwise."""
        return []

    def place(self, device: str) -> None:
        """Told once after loading where the engine runs (``cpu``, ``cuda:N``): a processor may
        then do its own work there (the PPN processor encodes BEV grids on that GPU) and hand the
        engine device tensors. Default: nothing."""
        return None

    def sample_inputs(self) -> dict[str, np.ndarray] | None:
        """A typical request's node-level inputs, or None. The node runs it through the whole
        path (pre + engine + post) right after loading and as its liveness probe, so the service
        time it reports before any request is the real one."""
        return None


ProcessorFactory = Callable[[Mapping[str, Any], Path], Processor]
_REGISTRY: dict[str, ProcessorFactory] = {}

# Modules that register processors, imported on first use.
_PROCESSOR_MODULES = (
    "moesaic.models.ppn.serving",
    "moesaic.models.detector.serving",
)


def register_processor(type_name: str, factory: ProcessorFactory) -> None:
    """Register a processor factory under ``type_name``."""
    _REGISTRY[type_name] = factory


def _load_processors() -> None:
    for module in _PROCESSOR_MODULES:
        importlib.import_module(module)


def processor_types() -> list[str]:
    """Names of the registered processors."""
    _load_processors()
    return sorted(_REGISTRY)


def create_processor(options: Mapping[str, Any], model_dir: Path) -> Processor:
    """Build the processor ``options["type"]`` names for the model folder ``model_dir``."""
    _load_processors()
    type_name = options.get("type")
    if type_name not in _REGISTRY:
        raise ValueError(f"processor.type: unknown processor {type_name!r}; known: {sorted(_REGISTRY)}")
    rest = {k: v for k, v in options.items() if k != "type"}
    return _REGISTRY[type_name](rest, model_dir)
