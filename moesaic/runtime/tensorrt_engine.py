"""TensorRT backend: runs a serialized plan built for this GPU by ``moesaic build-engine``.

In model.yaml::

    engine:
      type: tensorrt
      plan: model.plan       # deserialized with the TensorRT runtime
      onnx: model.onnx       # built into the plan when the plan is missing or was built elsewhere
      build: if-missing      # never | if-missing | always
      fp16: true

I/O is bound by tensor name (``set_input_shape``, ``set_tensor_address``) to device buffers
held by torch, and the plan runs with ``execute_async_v3`` on its own CUDA stream.

A plan build takes minutes. It happens inside :meth:`TensorRTEngine.load`; until load
returns, :attr:`~TensorRTEngine.ready` is False, :attr:`~TensorRTEngine.state` is
``"building"`` and :attr:`~TensorRTEngine.progress` holds the latest builder step, so a node
that calls ``load()`` on a worker thread reports the model as loading (NOT_SERVING) instead of
blocking. Written against the TensorRT 10 Python API; not verified on hardware here.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field

from moesaic.runtime.engine import (
    Engine,
    EngineConfig,
    EngineDescription,
    EngineError,
    MissingExtraError,
    TensorSpec,
    datatype_of,
    dtype_of,
    register_engine,
)
from moesaic.runtime.tensorrt_build import BuildProgress, build_plan, import_tensorrt
from moesaic.runtime.tensors import check_inputs
from moesaic.runtime.torch_engine import torch_dtype_of

__all__ = ["TensorRTEngine", "TensorRTEngineConfig"]

log = logging.getLogger(__name__)


class TensorRTEngineConfig(EngineConfig):
    """``engine:`` options of the TensorRT backend."""

    type: Literal["tensorrt"] = "tensorrt"
    plan: str = Field("model.plan", description="serialized plan in the model folder")
    onnx: str | None = Field("model.onnx", description="ONNX model to build the plan from")
    build: Literal["never", "if-missing", "always"] = Field(
        "if-missing", description="build the plan at load: never, when missing/incompatible, always"
    )
    fp16: bool = Field(False, description="allow FP16 kernels when building")
    int8: bool = Field(False, description="allow INT8 kernels when building (needs calib_dir)")
    calib_dir: str | None = Field(None, description="folder of .npy/.npz calibration batches")
    workspace_mb: int = Field(1024, ge=1, description="builder workspace memory pool limit, MiB")
    max_batch: int = Field(8, ge=1, description="largest batch of the default optimization profile")
    device_id: int = Field(0, ge=0, description="CUDA device index (the node sets it on GPU hosts)")


class TensorRTEngine(Engine):
    """One TensorRT plan on one CUDA device."""

    backend = "tensorrt"

    def __init__(self, config: TensorRTEngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = Path(model_dir)
        self.state = "idle"  # idle | building | loading | ready | failed | closed
        self._progress = BuildProgress(self._on_progress)
        self._lock = threading.Lock()
        self._engine: Any = None
        self._context: Any = None
        self._stream: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def progress(self) -> str:
        """The latest plan-builder step while :attr:`state` is ``building``."""
        return self._progress.line

    def _on_progress(self, line: str) -> None:
        log.info("%s: building plan: %s", self.model_dir.name, line)

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        if self.ready:
            return
        trt = import_tensorrt()
        torch = _torch()
        try:
            plan = self.model_dir / self.config.plan
            engine = None
            if self.config.build == "always" or not plan.is_file():
                self._build(plan)
            self.state = "loading"
            runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
            torch.cuda.set_device(self.config.device_id)
            engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None and self.config.build == "if-missing" and self._onnx() is not None:
                log.warning("%s: plan does not fit this GPU/TensorRT; rebuilding", plan)
                self._build(plan)
                self.state = "loading"
                engine = runtime.deserialize_cuda_engine(plan.read_bytes())
            if engine is None:
                raise EngineError(
                    f"{plan}: TensorRT cannot deserialize it (built for another GPU or version?)"
                )
            self._engine = engine
            self._context = engine.create_execution_context()
            self._stream = torch.cuda.Stream(device=self.config.device_id)
            self._inputs, self._outputs = self._io_specs(trt)
            self._warm_up()
        except BaseException:
            self.state = "failed"
            raise
        self.state = "ready"

    def _onnx(self) -> Path | None:
        if self.config.onnx is None:
            return None
        path = self.model_dir / self.config.onnx
        return path if path.is_file() else None

    def _build(self, plan: Path) -> None:
        onnx = self._onnx()
        if onnx is None or self.config.build == "never":
            raise EngineError(f"{plan} not found and no ONNX model to build it from (engine.onnx)")
        self.state = "building"
        build_plan(
            onnx,
            plan,
            fp16=self.config.fp16,
            int8=self.config.int8,
            calib_dir=self.model_dir / self.config.calib_dir if self.config.calib_dir else None,
            workspace_mb=self.config.workspace_mb,
            max_batch=self.config.max_batch,
            progress=self._progress,
        )

    def _io_specs(self, trt: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        inputs, outputs = [], []
        for i in range(self._engine.num_io_tensors):
            name = self._engine.get_tensor_name(i)
            dtype = np.dtype(trt.nptype(self._engine.get_tensor_dtype(name)))
            spec = TensorSpec(name, datatype_of(dtype), tuple(self._engine.get_tensor_shape(name)))
            if self._engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                inputs.append(spec)
            else:
                outputs.append(spec)
        return tuple(inputs), tuple(outputs)

    def _warm_up(self) -> None:
        shapes = {}
        for spec in self._inputs:
            if -1 in spec.shape:
                lo, _opt, _hi = self._engine.get_tensor_profile_shape(spec.name, 0)
                shapes[spec.name] = tuple(lo)
            else:
                shapes[spec.name] = spec.shape
        dummy = {s.name: np.zeros(shapes[s.name], dtype=dtype_of(s.datatype)) for s in self._inputs}
        for _ in range(2):
            self._run(dummy)

    def close(self) -> None:
        with self._lock:
            self._context = None
            self._engine = None
            self._stream = None
            if self.state != "idle":
                self.state = "closed"

    def describe(self) -> EngineDescription:
        if self._engine is None:
            raise EngineError("tensorrt engine: describe() before load()")
        details = {
            "plan": self.config.plan,
            "fp16": str(self.config.fp16).lower(),
            "int8": str(self.config.int8).lower(),
        }
        return EngineDescription(
            "tensorrt", f"cuda:{self.config.device_id}", self._inputs, self._outputs, details
        )

    # ------------------------------------------------------------ inference

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self.ready:
            raise EngineError(f"tensorrt engine: not ready (state {self.state})")
        check_inputs(self._inputs, inputs)
        return self._run(inputs)

    def _run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = _torch()
        with self._lock, torch.cuda.stream(self._stream):
            ctx = self._context
            if ctx is None:
                raise EngineError("tensorrt engine: closed")
            keep = []
            for spec in self._inputs:
                array = np.ascontiguousarray(inputs[spec.name])
                if not ctx.set_input_shape(spec.name, array.shape):
                    raise ValueError(
                        f"input {spec.name!r}: shape {list(array.shape)} is outside the plan's profile"
                    )
                dev = torch.from_numpy(array).to(f"cuda:{self.config.device_id}", non_blocking=True)
                keep.append(dev)
                ctx.set_tensor_address(spec.name, dev.data_ptr())
            outs = {}
            for spec in self._outputs:
                shape = tuple(ctx.get_tensor_shape(spec.name))
                if any(d < 0 for d in shape):
                    raise EngineError(f"output {spec.name!r}: data-dependent shape {shape} is not supported")
                buf = torch.empty(
                    shape, dtype=torch_dtype_of(torch, spec.datatype), device=f"cuda:{self.config.device_id}"
                )
                outs[spec.name] = buf
                ctx.set_tensor_address(spec.name, buf.data_ptr())
            if not ctx.execute_async_v3(self._stream.cuda_stream):
                raise EngineError("tensorrt engine: execute_async_v3 failed")
            host = {name: buf.to("cpu", non_blocking=True) for name, buf in outs.items()}
            self._stream.synchronize()
            del keep
            return {name: t.numpy() for name, t in host.items()}


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingExtraError("torch", "tensorrt") from None
    return torch


register_engine(TensorRTEngineConfig, TensorRTEngine)
