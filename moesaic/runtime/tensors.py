"""Input checks shared by the engines: every bad request gets a ``ValueError`` naming the tensor.

>>> import numpy as np
>>> from moesaic.runtime.engine import TensorSpec
>>> check_inputs((TensorSpec("x", "FP32", (-1, 3)),), {"x": np.zeros((2, 3), np.float32)})
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from moesaic.runtime.engine import TensorSpec, datatype_of

__all__ = ["TensorSpecModel", "check_inputs", "concrete_shape"]


class TensorSpecModel(BaseModel):
    """A tensor declared in model.yaml: ``{name: images, datatype: FP32, shape: [1, 3, 640, 640]}``."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field(description="tensor name")
    datatype: str = Field("FP32", description="KServe datatype: FP32, FP16, INT64, UINT8, ...")
    shape: list[int] = Field(description="dimensions; -1 marks a dynamic one")

    def spec(self) -> TensorSpec:
        return TensorSpec(self.name, self.datatype, tuple(self.shape))


def check_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the tensor when ``inputs`` does not fit ``specs``.

    Every declared input must be present, no unknown one may be, and each must be a numpy
    array of the declared datatype whose shape the spec accepts.
    """
    expected = [s.name for s in specs]
    unknown = sorted(set(inputs) - set(expected))
    if unknown:
        raise ValueError(f"input {unknown[0]!r}: unknown; the model takes {expected}")
    for spec in specs:
        if spec.name not in inputs:
            raise ValueError(f"input {spec.name!r}: missing; the model takes {expected}")
        value = inputs[spec.name]
        if not isinstance(value, np.ndarray):
            raise ValueError(f"input {spec.name!r}: expected a numpy array, got {type(value).__name__}")
        try:
            datatype = datatype_of(value.dtype)
        except ValueError:
            datatype = str(value.dtype)
        if datatype != spec.datatype:
            raise ValueError(f"input {spec.name!r}: datatype {datatype}, expected {spec.datatype}")
        if not spec.accepts_shape(tuple(value.shape)):
            raise ValueError(f"input {spec.name!r}: shape {list(value.shape)}, expected {list(spec.shape)}")


def concrete_shape(spec: TensorSpec, *, batch: int = 1, fill: int = 1) -> tuple[int, ...]:
    """``spec``'s shape with a dynamic leading dim set to ``batch`` and other dynamic dims ``fill``."""
    return tuple((batch if i == 0 else fill) if d == -1 else d for i, d in enumerate(spec.shape))
