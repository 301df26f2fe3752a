"""ONNX Runtime backend: serves ``model.onnx`` on the best execution provider present.

>>> engine = create_engine({"type": "onnxruntime"}, model_dir=Path("models/toy"))  # doctest: +SKIP
>>> engine.load()  # builds the session and runs one warm-up inference

Inputs and outputs come from the graph (symbolic or unknown dimensions become -1). With
``io_binding`` on and a GPU provider active, outputs are bound to host memory through an
``IOBinding`` so ONNX Runtime writes them there directly; on CPU plain ``run`` already reads
numpy inputs in place.
"""

from __future__ import annotations

import logging
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
    dtype_of,
    register_engine,
)
from moesaic.runtime.tensors import check_inputs

__all__ = ["DEFAULT_PROVIDERS", "OnnxRuntimeConfig", "OnnxRuntimeEngine", "ort_datatype"]

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
_GPU_PROVIDERS = {"TensorrtExecutionProvider", "CUDAExecutionProvider"}

_ORT_TYPES = {
    "tensor(bool)": "BOOL",
    "tensor(uint8)": "UINT8",
    "tensor(uint16)": "UINT16",
    "tensor(uint32)": "UINT32",
    "tensor(uint64)": "UINT64",
    "tensor(int8)": "INT8",
    "tensor(int16)": "INT16",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
    "tensor(float16)": "FP16",
    "tensor(float)": "FP32",
    "tensor(double)": "FP64",
    "tensor(string)": "BYTES",
}


def ort_datatype(ort_type: str) -> str:
    """KServe datatype of an ONNX Runtime type string such as ``tensor(float)``."""
    try:
        return _ORT_TYPES[ort_type]
    except KeyError:
        raise EngineError(f"ONNX type {ort_type} has no KServe datatype") from None


class OnnxRuntimeConfig(EngineConfig):
    """``engine:`` section of a model.yaml for ONNX Runtime."""

    type: Literal["onnxruntime"] = "onnxruntime"
    file: str = Field("model.onnx", description="ONNX file, relative to the model folder.")
    providers: list[str] | None = Field(
        None,
        description="Execution providers in order of preference; default: those of "
        "TensorRT, CUDA, CPU that are present.",
    )
    device_id: int = Field(0, ge=0, description="GPU index for the CUDA and TensorRT providers.")
    intra_op_threads: int = Field(
        0, ge=0, description="Threads inside one operator; 0 = ONNX Runtime's default."
    )
    inter_op_threads: int = Field(
        0, ge=0, description="Threads across operators; 0 = ONNX Runtime's default."
    )
    spin_wait: bool = Field(
        False,
        description="Let ONNX Runtime's thread pool spin between operators and calls: a little "
        "faster for back-to-back large models, but it burns a core (energy) and steals CPU from "
        "the request threads on small edge CPUs.",
    )
    io_binding: bool = Field(True, description="Bind outputs to host memory with IOBinding on GPU providers.")
    warmup_runs: int = Field(1, ge=0, description="Inferences on zero inputs run by load().")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "all") from None
    return onnxruntime


def _spec(node: Any) -> TensorSpec:
    shape = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in (node.shape or ()))
    return TensorSpec(node.name, ort_datatype(node.type), shape)


class OnnxRuntimeEngine(Engine):
    """One ONNX model in one ``onnxruntime.InferenceSession``."""

    backend = "onnxruntime"

    def __init__(self, config: OnnxRuntimeConfig, model_dir: Path) -> None:
        self.config = config
        self.path = Path(model_dir) / config.file
        self._session: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._output_names: list[str] = []
        self._string_inputs: frozenset[str] = frozenset()
        self._use_binding = False
        self._device = "cpu"
        self._ort: Any = None
        self._run: Any = None
        self._required: frozenset[str] = frozenset()

    # -------------------------------------------------------------- lifecycle

    def load(self) -> None:
        ort = self._ort = _import_ort()
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such ONNX file")
        available = ort.get_available_providers()
        wanted = self.config.providers or [p for p in DEFAULT_PROVIDERS if p in available]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(
                f"{self.path}: execution providers {missing} are not available; present: {available}"
            )
        providers: list[Any] = [
            (p, {"device_id": self.config.device_id}) if p in _GPU_PROVIDERS else p for p in wanted
        ]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if self.config.intra_op_threads:
            options.intra_op_num_threads = self.config.intra_op_threads
        if self.config.inter_op_threads:
            options.inter_op_num_threads = self.config.inter_op_threads
        if not self.config.spin_wait:
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            options.add_session_config_entry("session.inter_op.allow_spinning", "0")
        try:
            session = ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as exc:  # ORT raises its own exception types
            raise EngineError(f"{self.path}: ONNX Runtime cannot load it: {exc}") from exc
        self._inputs = tuple(_spec(node) for node in session.get_inputs())
        self._outputs = tuple(_spec(node) for node in session.get_outputs())
        self._output_names = [o.name for o in self._outputs]
        self._string_inputs = frozenset(s.name for s in self._inputs if s.datatype == "BYTES")
        active = session.get_providers()[0]
        self._device = f"cuda:{self.config.device_id}" if active in _GPU_PROVIDERS else "cpu"
        self._use_binding = self.config.io_binding and active in _GPU_PROVIDERS
        # On CPU alone, call the session's C++ ``run`` directly: the Python wrapper's checks
        # (missing inputs, WebGPU graph capture, OrtValue ownership) and its GPU fallback cost
        # more than a small model's inference; missing inputs are checked here instead.
        native = getattr(session, "_sess", None)
        cpu_only = session.get_providers() == ["CPUExecutionProvider"]
        self._run = native.run if cpu_only and native is not None else session.run
        self._required = frozenset(s.name for s in self._inputs)
        self._session = session
        for _ in range(self.config.warmup_runs):
            self._warm_up()

    def _warm_up(self) -> None:
        feed: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            shape = tuple(d if d >= 0 else 1 for d in spec.shape)
            if spec.datatype == "BYTES":
                feed[spec.name] = np.full(shape, "", dtype=object)
            else:
                feed[spec.name] = np.zeros(shape, dtype=dtype_of(spec.datatype))
        try:
            self.infer(feed)
        except (EngineError, ValueError) as exc:  # e.g. a dynamic dim that must not be 1
            log.warning(
                "%s: warm-up on zero inputs failed (%s); the first request will be slower", self.path, exc
            )

    @property
    def ready(self) -> bool:
        return self._session is not None

    def close(self) -> None:
        self._session = None
        self._run = None

    def describe(self) -> EngineDescription:
        if self._session is None:
            raise EngineError(f"{self.path}: engine not loaded")
        return EngineDescription(
            backend=self.backend,
            device=self._device,
            inputs=self._inputs,
            outputs=self._outputs,
            details={
                "providers": ",".join(self._session.get_providers()),
                "provider": self._session.get_providers()[0],
                "available": ",".join(self._ort.get_available_providers()),
                "file": str(self.path),
            },
        )

    # -------------------------------------------------------------- inference

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise EngineError(f"{self.path}: engine not loaded")
        feed = inputs
        if self._string_inputs:
            feed = dict(inputs)
            for name in self._string_inputs & feed.keys():
                arr = feed[name]
                feed[name] = np.vectorize(_as_str, otypes=[object])(arr) if arr.size else arr.astype(object)
        try:
            if self._use_binding:
                return self._infer_bound(session, feed)
            if not self._required <= feed.keys():
                raise ValueError("required inputs missing")  # check_inputs below names them
            results = self._run(self._output_names, feed, None)
        except self._ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise ValueError(f"{self.path.parent.name}: {exc}") from None
        except Exception as exc:
            # Bad input (a missing or unknown tensor, a wrong shape) is the caller's error, not
            # the engine's: check only now, so the hot path pays nothing for it.
            check_inputs(self._inputs, inputs)
            raise EngineError(f"{self.path.parent.name}: inference failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))

    def _infer_bound(self, session: Any, feed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        binding = session.io_binding()
        for name, array in feed.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(array))
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        session.run_with_iobinding(binding)
        return dict(zip(self._output_names, binding.copy_outputs_to_cpu(), strict=True))


def _as_str(item: Any) -> str:
    return item.decode() if isinstance(item, bytes | bytearray) else str(item)


register_engine(OnnxRuntimeConfig, OnnxRuntimeEngine)
