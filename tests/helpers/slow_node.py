"""``moesaic`` CLI with two test parts registered: a processor, ``test_sleep``, that sleeps
``seconds`` before the engine call (the SIGTERM test holds a request in flight with it), and an
engine, ``test_hang``, that echoes ``x`` but blocks forever on an input whose first value is
13 (a hung engine for the watchdog test; a real engine cannot be made to hang on demand).

    python tests/helpers/slow_node.py node --models DIR --listen HOST:PORT
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

from moesaic.cli import main
from moesaic.runtime.engine import (
    Engine,
    EngineConfig,
    EngineDescription,
    TensorSpec,
    register_engine,
)
from moesaic.runtime.processing import Processor, register_processor


class SleepProcessor(Processor):
    """Pass-through that sleeps ``options["seconds"]`` in preprocess."""

    def inputs(self, engine_inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return engine_inputs

    def outputs(self, engine_outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        return engine_outputs

    def preprocess(
        self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], Any]:
        time.sleep(float(self.options.get("seconds", 1.0)))
        return dict(inputs), None

    def postprocess(self, outputs: Mapping[str, np.ndarray], context: Any) -> dict[str, np.ndarray]:
        return dict(outputs)


def _factory(options: Mapping[str, Any], model_dir: Path) -> Processor:
    return SleepProcessor(options, model_dir)


register_processor("test_sleep", _factory)


class HangConfig(EngineConfig):
    type: Literal["test_hang"] = "test_hang"


class HangEngine(Engine):
    """Echoes ``x`` (FP32 [-1, 4]) as ``y``; blocks forever when ``x[0, 0] == 13``."""

    backend = "test_hang"

    def __init__(self, config: HangConfig, model_dir: Path) -> None:
        self._ready = False
        self._never = threading.Event()

    def load(self) -> None:
        self._ready = True

    @property
    def ready(self) -> bool:
        return self._ready

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = inputs["x"]
        if x.size and x.flat[0] == 13:
            self._never.wait()
        return {"y": np.array(x)}

    def describe(self) -> EngineDescription:
        spec = (TensorSpec("x", "FP32", (-1, 4)),)
        return EngineDescription("test_hang", "cpu", spec, (TensorSpec("y", "FP32", (-1, 4)),))

    def close(self) -> None:
        self._ready = False


register_engine(HangConfig, HangEngine)

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
