"""ONNX Runtime backend: serves ``model.onnx`` on the best execution provider present.

>>> engine = create_engine({"type": "onnxruntime"}, model_dir=Path("models/toy"))  # doctest: +SKIP
>>> engine.load()  # builds the session and runs one warm-up inference

Inputs and outputs come from the graph (symbolic or unknown dimensions become -1). Providers
(:mod:`moesaic.runtime.ort_providers`): TensorRT only when its libraries load (engine cache in
the node's cache folder, fp16 unless ``tensorrt_fp16: false``), then CUDA, then CPU. On a GPU
provider with ``io_binding`` (default) inputs go through device buffers bound once per input
signature, outputs are bound on the device and copied back once, and ``cuda_graph: true``
replays a captured CUDA graph (:mod:`moesaic.runtime.ort_binding`); such an engine also takes
torch CUDA tensors as inputs (a BEV grid encoded on the GPU) without a trip through the host.
On CPU plain ``run`` reads numpy inputs in place.
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
from moesaic.runtime.ort_binding import DeviceBinding, is_torch_cuda, ort_datatype
from moesaic.runtime.ort_providers import (
    CPU,
    GPU_PROVIDERS,
    TENSORRT,
    preload_cuda_libraries,
    provider_options,
    tensorrt_problem,
)
from moesaic.runtime.tensors import check_inputs

__all__ = ["DEFAULT_PROVIDERS", "OnnxRuntimeConfig", "OnnxRuntimeEngine"]

log = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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
    io_binding: bool = Field(
        True,
        description="On GPU providers: bind device buffers once per input signature (inputs copied "
        "in once, outputs bound on the device and copied back once).",
    )
    cuda_graph: bool = Field(
        False,
        description="On GPU providers: capture the model as a CUDA graph per input signature and "
        "replay it (needs io_binding and a graph whose every node runs on the GPU; when ONNX "
        "Runtime refuses, the session is built without and a warning says so).",
    )
    tensorrt_fp16: bool = Field(
        True, description="Let the TensorRT provider build fp16 kernels where they are faster."
    )
    tensorrt_cache: str | None = Field(
        None,
        description="Folder of TensorRT engine and timing caches; default: the node's cache folder "
        "(onnxruntime-tensorrt/ under $MOESAIC_CACHE_DIR, $CACHE_DIRECTORY or ~/.cache/moesaic).",
    )
    warmup_runs: int = Field(1, ge=0, description="Inferences on zero inputs run by load().")


def _import_ort() -> Any:
    try:
        import onnxruntime
    except ImportError:
        raise MissingExtraError("onnxruntime", "cpu", "gpu") from None
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
        self._binding: DeviceBinding | None = None
        self._device = "cpu"
        self._ort: Any = None
        self._run: Any = None
        self._run_options: Any = None
        self._required: frozenset[str] = frozenset()

    # -------------------------------------------------------------- lifecycle

    def load(self) -> None:
        ort = self._ort = _import_ort()
        if not self.path.is_file():
            raise EngineError(f"{self.path}: no such ONNX file")
        available = ort.get_available_providers()
        wanted = self.config.providers or self._default_providers(available)
        missing = [p for p in wanted if p not in available]
        if missing:
            raise EngineError(
                f"{self.path}: execution providers {missing} are not available; present: {available}"
            )
        if TENSORRT in wanted and (problem := tensorrt_problem()) is not None:
            raise EngineError(f"{self.path}: providers name {TENSORRT}, but {problem}")
        if GPU_PROVIDERS & set(wanted):
            preload_cuda_libraries()
        if self.config.cuda_graph and GPU_PROVIDERS & set(wanted) and self.config.io_binding:
            try:
                self._open(ort, wanted, cuda_graph=True)
                for _ in range(max(self.config.warmup_runs, 2)):  # the second run captures the graph
                    self.infer(self._zero_feed())
                return
            except Exception as exc:  # ORT raises its own exception types
                log.warning("%s: CUDA graphs refused by ONNX Runtime (%s); running without", self.path, exc)
                self.close()
        self._open(ort, wanted, cuda_graph=False)
        for _ in range(self.config.warmup_runs):
            self._warm_up()

    def _open(self, ort: Any, wanted: list[str], *, cuda_graph: bool) -> None:
        """Build the session (and its device binding) on the ``wanted`` providers."""
        config = self.config
        providers: list[Any] = [
            (
                p,
                provider_options(
                    p,
                    device_id=config.device_id,
                    model_file=self.path,
                    cuda_graph=cuda_graph,
                    fp16=config.tensorrt_fp16,
                    tensorrt_cache=Path(config.tensorrt_cache) if config.tensorrt_cache else None,
                ),
            )
            if p in GPU_PROVIDERS
            else p
            for p in wanted
        ]
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        if config.intra_op_threads:
            options.intra_op_num_threads = config.intra_op_threads
        if config.inter_op_threads:
            options.inter_op_num_threads = config.inter_op_threads
        if not config.spin_wait:
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
        self._device = f"cuda:{config.device_id}" if active in GPU_PROVIDERS else "cpu"
        self._binding = None
        if config.io_binding and active in GPU_PROVIDERS and not self._string_inputs:
            self._binding = DeviceBinding(
                ort, session, self._output_names, device_id=config.device_id, cuda_graph=cuda_graph
            )
        elif cuda_graph:
            raise EngineError(f"{self.path}: CUDA graphs need a GPU provider, io_binding, no string inputs")
        # On CPU alone, call the session's C++ ``run`` directly: the Python wrapper's checks
        # (missing inputs, WebGPU graph capture, OrtValue ownership) and its GPU fallback cost
        # more than a small model's inference; missing inputs are checked here instead.
        native = getattr(session, "_sess", None)
        cpu_only = session.get_providers() == [CPU]
        self._run = native.run if cpu_only and native is not None else session.run
        self._run_options = ort.RunOptions()  # one for every call: None would build one per call
        self._required = frozenset(s.name for s in self._inputs)
        self._session = session

    @staticmethod
    def _default_providers(available: list[str]) -> list[str]:
        """TensorRT (when its libraries load), CUDA, CPU: those of them present."""
        return [
            p for p in DEFAULT_PROVIDERS if p in available and (p != TENSORRT or tensorrt_problem() is None)
        ]

    def _zero_feed(self) -> dict[str, np.ndarray]:
        feed: dict[str, np.ndarray] = {}
        for spec in self._inputs:
            shape = tuple(d if d >= 0 else 1 for d in spec.shape)
            if spec.datatype == "BYTES":
                feed[spec.name] = np.full(shape, "", dtype=object)
            else:
                feed[spec.name] = np.zeros(shape, dtype=dtype_of(spec.datatype))
        return feed

    def _warm_up(self) -> None:
        try:
            self.infer(self._zero_feed())
        except (EngineError, ValueError) as exc:  # e.g. a dynamic dim that must not be 1
            log.warning(
                "%s: warm-up on zero inputs failed (%s); the first request will be slower", self.path, exc
            )

    @property
    def ready(self) -> bool:
        return self._session is not None

    def close(self) -> None:
        self._session = None
        self._binding = None
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
                "io_binding": str(self._binding is not None).lower(),
                "cuda_graph": str(self._binding is not None and self._binding.cuda_graph).lower(),
            },
        )

    # -------------------------------------------------------------- inference

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._session
        if session is None:
            raise EngineError(f"{self.path}: engine not loaded")
        feed = inputs
        binding = self._binding
        if binding is None and any(is_torch_cuda(v) for v in inputs.values()):
            feed = {k: _host(v) for k, v in inputs.items()}  # a torch CUDA tensor on a CPU session
        if self._string_inputs:
            feed = dict(feed)
            for name in self._string_inputs & feed.keys():
                arr = feed[name]
                feed[name] = np.vectorize(_as_str, otypes=[object])(arr) if arr.size else arr.astype(object)
        try:
            if binding is not None:
                return binding.run(feed)
            if not self._required <= feed.keys():
                raise ValueError("required inputs missing")  # check_inputs below names them
            results = self._run(self._output_names, feed, self._run_options)
        except self._ort.capi.onnxruntime_pybind11_state.InvalidArgument as exc:
            raise ValueError(f"{self.path.parent.name}: {exc}") from None
        except Exception as exc:
            # Bad input (a missing or unknown tensor, a wrong shape) is the caller's error, not
            # the engine's: check only now, so the hot path pays nothing for it.
            check_inputs(self._inputs, inputs)
            raise EngineError(f"{self.path.parent.name}: inference failed: {exc}") from exc
        return dict(zip(self._output_names, results, strict=True))


def _host(value: Any) -> np.ndarray:
    return np.asarray(value.cpu().numpy()) if is_torch_cuda(value) else value


def _as_str(item: Any) -> str:
    return item.decode() if isinstance(item, bytes | bytearray) else str(item)


register_engine(OnnxRuntimeConfig, OnnxRuntimeEngine)
