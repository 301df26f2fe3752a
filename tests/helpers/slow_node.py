"""``moesaic`` CLI with one extra processor, ``test_sleep``, that sleeps ``seconds`` before the
engine call. Used by the SIGTERM test to hold a request in flight.

    python tests/helpers/slow_node.py node --models DIR --listen HOST:PORT
"""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.cli import main
from moesaic.runtime.engine import TensorSpec
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

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
