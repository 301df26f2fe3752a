"""PyTorch backend: TorchScript (``.ts``/``.pt``) or ``torch.export`` programs (``.pt2``).

The GPU path for hosts without TensorRT or a CUDA build of ONNX Runtime. In model.yaml::

    engine:
      type: torch
      file: model.pt2        # default: the first of model.pt2, model.ts, model.pt
      device: cuda:0         # cpu, cuda, cuda:N or auto
      precision: fp16        # fp32, fp16 or bf16 (floating inputs/outputs stay as declared)
      cuda_graphs: true      # capture once after warm-up and replay for static shapes

Inputs and outputs (names, datatypes, shapes) come from ``engine.inputs``/``engine.outputs``,
else from a ``moesaic.json`` embedded in the file by :func:`save_torch_model`, else (for
``.pt2``) from the exported graph. On CUDA with static input shapes the forward pass is
captured in a CUDA graph after warm-up and replayed from pinned host buffers; requests of
any other shape run eagerly. ``torch`` is imported lazily (extra ``gpu``).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
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
    register_engine,
)
from moesaic.runtime.ort_binding import is_torch_cuda
from moesaic.runtime.tensors import TensorSpecModel, check_inputs, concrete_shape

__all__ = ["CUDA_GATE", "TorchEngine", "TorchEngineConfig", "save_torch_model"]

log = logging.getLogger(__name__)

METADATA_FILE = "moesaic.json"
_DEFAULT_FILES = ("model.pt2", "model.ts", "model.pt")
_EXPORT_LOAD = threading.Lock()
"""``torch.export.load`` keeps its deserializer in a global: two programs loaded at once (a node
loads its models on a thread each) fail with "_CURRENT_DESERIALIZER is already set"."""


class _CudaGate:
    """Readers-writer gate over this process's CUDA work: inference and GPU encoding share it,
    an engine's device-side load (weights to the GPU, warm-up, graph capture) holds it alone.

    A node loads its models on a thread each, and may load one while others serve. A CUDA graph
    capture is invalidated by work another thread puts on the device meanwhile (a warm-up's
    device synchronize, a legacy-stream launch): cudaErrorStreamCaptureInvalidated with two large
    PPN models on an H200. Loads are rare; inference only waits while one runs.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._sharing = 0
        self._alone = False

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._sharing += 1
        try:
            yield
        finally:
            with self._cond:
                self._sharing -= 1
                self._cond.notify_all()

    @contextmanager
    def alone(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._alone)
            self._alone = True  # new sharers wait from here on
            self._cond.wait_for(lambda: self._sharing == 0)
        try:
            yield
        finally:
            with self._cond:
                self._alone = False
                self._cond.notify_all()


CUDA_GATE = _CudaGate()
"""Held shared around CUDA work on the request path, alone around an engine's device-side load."""


class TorchEngineConfig(EngineConfig):
    """``engine:`` options of the PyTorch backend."""

    type: Literal["torch"] = "torch"
    file: str | None = Field(None, description="model file in the folder (.pt2, .ts or .pt)")
    device: str = Field("auto", description="cpu, cuda, cuda:N or auto (cuda:0 when available)")
    precision: Literal["fp32", "fp16", "bf16"] = Field("fp32", description="compute precision")
    cuda_graphs: bool = Field(True, description="capture and replay CUDA graphs for static shapes")
    static_shapes: dict[str, list[int]] | None = Field(
        None, description="input shapes to warm up and capture when the declared ones are dynamic"
    )
    inputs: list[TensorSpecModel] | None = Field(None, description="input tensors (override the file's)")
    outputs: list[TensorSpecModel] | None = Field(None, description="output tensors (override the file's)")
    warmup_runs: int = Field(3, ge=0, description="forward passes in load() before serving")
    threads: int | None = Field(None, ge=1, description="CPU intra-op threads (process-wide setting)")


def _torch() -> Any:
    try:
        import torch
    except ImportError:
        raise MissingExtraError("torch", "gpu") from None
    return torch


def torch_dtype_of(torch: Any, datatype: str) -> Any:
    """The torch dtype of a KServe datatype (``EngineError`` when torch has none)."""
    table = {
        "BOOL": torch.bool,
        "UINT8": torch.uint8,
        "INT8": torch.int8,
        "INT16": torch.int16,
        "INT32": torch.int32,
        "INT64": torch.int64,
        "FP16": torch.float16,
        "FP32": torch.float32,
        "FP64": torch.float64,
    }
    try:
        return table[datatype]
    except KeyError:
        raise EngineError(f"torch backend: datatype {datatype} is not supported") from None


def _datatype_of_torch(dtype: Any) -> str:
    torch = _torch()
    return datatype_of(torch.empty((), dtype=dtype).numpy().dtype) if dtype != torch.bfloat16 else "FP32"


def save_torch_model(
    model: Any, path: Path | str, *, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec]
) -> None:
    """Save a ScriptModule (``.ts``/``.pt``) or ExportedProgram (``.pt2``) with its I/O description."""
    torch = _torch()
    meta = json.dumps(
        {
            "inputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in inputs],
            "outputs": [{"name": s.name, "datatype": s.datatype, "shape": list(s.shape)} for s in outputs],
        }
    )
    if isinstance(model, torch.export.ExportedProgram):
        torch.export.save(model, str(path), extra_files={METADATA_FILE: meta})
    elif isinstance(model, torch.jit.ScriptModule):
        torch.jit.save(model, str(path), _extra_files={METADATA_FILE: meta})
    else:
        raise TypeError(
            f"expected a torch.jit.ScriptModule or torch.export.ExportedProgram, got {type(model)}"
        )


class _Graph:
    """One captured CUDA graph: static device inputs/outputs and pinned host input buffers."""

    def __init__(
        self, graph: Any, dev_in: dict[str, Any], dev_out: list[Any], host_in: dict[str, Any]
    ) -> None:
        self.graph, self.dev_in, self.dev_out, self.host_in = graph, dev_in, dev_out, host_in
        self.shapes = {name: tuple(t.shape) for name, t in dev_in.items()}


class TorchEngine(Engine):
    """One TorchScript or torch.export model on a CPU or CUDA device."""

    backend = "torch"

    def __init__(self, config: TorchEngineConfig, model_dir: Path) -> None:
        self.config = config
        self.model_dir = Path(model_dir)
        self._model: Any = None
        self._device: Any = None
        self._inputs: tuple[TensorSpec, ...] = ()
        self._outputs: tuple[TensorSpec, ...] = ()
        self._graph: _Graph | None = None
        self._format = ""
        self._path: Path | None = None
        self._lock = threading.Lock()
        self._ready = False

    # ------------------------------------------------------------ lifecycle

    @property
    def ready(self) -> bool:
        return self._ready

    def load(self) -> None:
        if self._ready:
            return
        torch = _torch()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self._path = path = self._model_file()
        self._device = self._resolve_device(torch)
        extra = {METADATA_FILE: ""}
        try:
            if path.suffix == ".pt2":
                with _EXPORT_LOAD:
                    program = torch.export.load(str(path), extra_files=extra)
                self._format = "torch.export"
                model = program.module()
            else:
                program = None
                model = torch.jit.load(str(path), map_location=self._device, _extra_files=extra)
                self._format = "torchscript"
                model.eval()
        except Exception as exc:
            raise EngineError(f"{path}: cannot load: {exc}") from exc
        self._inputs, self._outputs = self._io_specs(extra[METADATA_FILE], program)
        dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[self.config.precision]
        with self._gate(alone=True):
            model = model.to(self._device)
            self._model = model.to(dtype) if dtype != torch.float32 else model
            self._compute_dtype = dtype
            self._warm_up(torch)
            if self._device.type == "cuda" and self.config.cuda_graphs:
                shapes = self._static_shapes()
                if shapes is not None:
                    self._graph = self._capture(torch, shapes)
        self._ready = True
        log.info("torch engine ready: %s on %s (%s)", path.name, self._device, self.config.precision)

    def close(self) -> None:
        with self._lock:
            was_cuda = self._device is not None and self._device.type == "cuda"
            self._ready = False
            self._model = None
            self._graph = None
            if was_cuda:
                _torch().cuda.empty_cache()

    def describe(self) -> EngineDescription:
        if self._path is None:
            raise EngineError("torch engine: describe() before load()")
        details = {
            "file": self._path.name,
            "format": self._format,
            "precision": self.config.precision,
            "cuda_graphs": "on" if self._graph is not None else "off",
        }
        if self._graph is not None:
            details["graph_shapes"] = json.dumps({k: list(v) for k, v in self._graph.shapes.items()})
        return EngineDescription("torch", str(self._device), self._inputs, self._outputs, details)

    # ------------------------------------------------------------ inference

    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if not self._ready:
            raise EngineError("torch engine: infer() before load() or after close()")
        if any(is_torch_cuda(v) for v in inputs.values()):
            _check_device_inputs(self._inputs, inputs)  # e.g. a BEV grid the processor made on the GPU
        else:
            check_inputs(self._inputs, inputs)
        torch = _torch()
        with self._lock, self._gate(alone=False), torch.inference_mode():
            if not self._ready:
                raise EngineError("torch engine: closed")
            try:
                graph = self._graph
                if graph is not None and all(tuple(inputs[n].shape) == s for n, s in graph.shapes.items()):
                    outs = self._replay(torch, graph, inputs)
                else:
                    dev = {n: _as_tensor(torch, a).to(self._device) for n, a in inputs.items()}
                    outs = [t.cpu().numpy() for t in self._forward(dev)]
            except (EngineError, ValueError):
                raise
            except Exception as exc:
                raise EngineError(f"torch engine: inference failed: {exc}") from exc
        return {spec.name: out for spec, out in zip(self._outputs, outs, strict=True)}

    def _forward(self, dev_inputs: Mapping[str, Any]) -> list[Any]:
        """Run the model on device tensors; outputs cast to their declared datatypes."""
        torch = _torch()
        args = []
        for spec in self._inputs:
            t = dev_inputs[spec.name]
            if t.is_floating_point() and t.dtype != self._compute_dtype:
                t = t.to(self._compute_dtype)
            args.append(t)
        result = self._model(*args)
        if isinstance(result, Mapping):
            names = [s.name for s in self._outputs]
            tensors = [result[n] for n in names] if set(names) <= set(result) else list(result.values())
        elif isinstance(result, list | tuple):
            tensors = list(result)
        else:
            tensors = [result]
        if len(tensors) != len(self._outputs):
            raise EngineError(
                f"torch engine: model returned {len(tensors)} outputs, declared {len(self._outputs)}"
            )
        return [t.to(torch_dtype_of(torch, s.datatype)) for t, s in zip(tensors, self._outputs, strict=True)]

    def _replay(self, torch: Any, graph: _Graph, inputs: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        for name, host in graph.host_in.items():
            value = inputs[name]
            if is_torch_cuda(value):
                graph.dev_in[name].copy_(value, non_blocking=True)  # device to device
                continue
            np.copyto(host.numpy(), value)
            graph.dev_in[name].copy_(host, non_blocking=True)
        graph.graph.replay()
        # Fresh pinned buffers from torch's caching host allocator: the DMA runs at full speed
        # and the returned arrays own their memory (no second host copy).
        host_out = [torch.empty(dev.shape, dtype=dev.dtype, pin_memory=True) for dev in graph.dev_out]
        for dev, host in zip(graph.dev_out, host_out, strict=True):
            host.copy_(dev, non_blocking=True)
        torch.cuda.current_stream(self._device).synchronize()
        return [host.numpy() for host in host_out]

    # ------------------------------------------------------------ loading helpers

    def _gate(self, *, alone: bool) -> AbstractContextManager[None]:
        """:data:`CUDA_GATE` for an engine on a CUDA device; nothing to take on the CPU."""
        if self._device is None or self._device.type != "cuda":
            return nullcontext()
        return CUDA_GATE.alone() if alone else CUDA_GATE.shared()

    def _model_file(self) -> Path:
        if self.config.file:
            path = self.model_dir / self.config.file
            if not path.is_file():
                raise EngineError(f"engine.file: {path} not found")
            return path
        for name in _DEFAULT_FILES:
            if (self.model_dir / name).is_file():
                return self.model_dir / name
        raise EngineError(
            f"{self.model_dir}: no model file; expected one of {list(_DEFAULT_FILES)} or engine.file"
        )

    def _resolve_device(self, torch: Any) -> Any:
        spec = self.config.device.strip().lower()
        if spec == "auto":
            spec = "cuda:0" if torch.cuda.is_available() else "cpu"
        if spec.startswith("cuda"):
            if not torch.cuda.is_available():
                raise EngineError(f"engine.device: {self.config.device!r} but torch sees no CUDA device")
            index = int(spec.partition(":")[2] or 0)
            if index >= torch.cuda.device_count():
                raise EngineError(
                    f"engine.device: {spec!r} but torch sees {torch.cuda.device_count()} GPU(s)"
                )
            return torch.device("cuda", index)
        if spec != "cpu":
            raise EngineError(f"engine.device: {self.config.device!r}; expected cpu, cuda, cuda:N or auto")
        return torch.device("cpu")

    def _io_specs(self, meta: str, program: Any) -> tuple[tuple[TensorSpec, ...], tuple[TensorSpec, ...]]:
        embedded: dict[str, Any] = json.loads(meta) if meta else {}
        inputs = [s.spec() for s in self.config.inputs] if self.config.inputs else None
        outputs = [s.spec() for s in self.config.outputs] if self.config.outputs else None
        if inputs is None and "inputs" in embedded:
            inputs = [TensorSpecModel.model_validate(s).spec() for s in embedded["inputs"]]
        if outputs is None and "outputs" in embedded:
            outputs = [TensorSpecModel.model_validate(s).spec() for s in embedded["outputs"]]
        if program is not None:
            if inputs is None:
                inputs = _program_inputs(program)
            if outputs is None:
                outputs = _program_outputs(program)
        if not inputs or not outputs:
            raise EngineError(
                f"{self._path}: inputs/outputs unknown; declare engine.inputs and engine.outputs in "
                "model.yaml or save the model with moesaic.runtime.torch_engine.save_torch_model"
            )
        return tuple(inputs), tuple(outputs)

    def _static_shapes(self) -> dict[str, tuple[int, ...]] | None:
        """Shapes to capture a graph for: the declared ones when fixed, else ``static_shapes``."""
        given = self.config.static_shapes or {}
        shapes = {}
        for spec in self._inputs:
            if spec.name in given:
                shapes[spec.name] = tuple(given[spec.name])
            elif -1 not in spec.shape:
                shapes[spec.name] = spec.shape
            else:
                return None
        return shapes

    def _warm_up(self, torch: Any) -> None:
        if self.config.warmup_runs == 0:
            return
        shapes = self._static_shapes()
        guessed = shapes is None
        if shapes is None:
            shapes = {s.name: concrete_shape(s) for s in self._inputs}
        dev = {
            s.name: torch.zeros(shapes[s.name], dtype=torch_dtype_of(torch, s.datatype), device=self._device)
            for s in self._inputs
        }
        try:
            with torch.inference_mode():
                for _ in range(self.config.warmup_runs):
                    self._forward(dev)
                if self._device.type == "cuda":
                    torch.cuda.synchronize(self._device)
        except Exception as exc:
            if not guessed:
                raise EngineError(f"{self._path}: warm-up failed for shapes {shapes}: {exc}") from exc
            log.warning(
                "%s: warm-up skipped: guessed shapes %s failed (%s); set engine.static_shapes",
                self._path,
                shapes,
                exc,
            )

    def _capture(self, torch: Any, shapes: Mapping[str, tuple[int, ...]]) -> _Graph:
        dev_in = {
            s.name: torch.zeros(shapes[s.name], dtype=torch_dtype_of(torch, s.datatype), device=self._device)
            for s in self._inputs
        }
        side = torch.cuda.Stream(self._device)
        side.wait_stream(torch.cuda.current_stream(self._device))
        with torch.inference_mode(), torch.cuda.stream(side):
            for _ in range(3):
                self._forward(dev_in)
        torch.cuda.current_stream(self._device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's default capture stream is made once, on the first GPU to capture;
        # an engine on another GPU needs a capture stream of its own device. Other threads' CUDA
        # work waits at CUDA_GATE meanwhile; thread-local mode leaves their host-side calls
        # (another engine's file load, a pinned allocation) unchecked.
        stream = torch.cuda.Stream(self._device)
        capture = torch.cuda.graph(graph, stream=stream, capture_error_mode="thread_local")
        with torch.inference_mode(), capture:
            dev_out = self._forward(dev_in)
        host_in = {n: torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for n, t in dev_in.items()}
        return _Graph(graph, dev_in, dev_out, host_in)


def _as_tensor(torch: Any, value: Any) -> Any:
    """A torch tensor as is, a numpy array as a (CPU) tensor."""
    return value if is_torch_cuda(value) else torch.from_numpy(np.ascontiguousarray(value))


def _check_device_inputs(specs: Sequence[TensorSpec], inputs: Mapping[str, Any]) -> None:
    """:func:`check_inputs` for torch CUDA tensors: names, datatypes and shapes."""
    torch = _torch()
    expected = {s.name: s for s in specs}
    if set(inputs) != set(expected):
        raise ValueError(f"inputs {sorted(inputs)}: the model takes {sorted(expected)}")
    for name, value in inputs.items():
        spec = expected[name]
        if is_torch_cuda(value) and value.dtype != torch_dtype_of(torch, spec.datatype):
            raise ValueError(f"input {name!r}: dtype {value.dtype}, expected {spec.datatype}")
        if not spec.accepts_shape(tuple(value.shape)):
            raise ValueError(f"input {name!r}: shape {list(value.shape)}, expected {list(spec.shape)}")


def _program_inputs(program: Any) -> list[TensorSpec]:
    names = list(program.graph_signature.user_inputs)
    specs = []
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            specs.append(TensorSpec(node.name, _datatype_of_torch(val.dtype), _dims(val.shape)))
    return specs


def _program_outputs(program: Any) -> list[TensorSpec]:
    output_node = next(n for n in program.graph.nodes if n.op == "output")
    values = output_node.args[0]
    count = len(program.graph_signature.user_outputs)
    vals: list[Any] = [getattr(v, "meta", {}).get("val") for v in values][-count:]
    return [TensorSpec(f"output{i}", _datatype_of_torch(v.dtype), _dims(v.shape)) for i, v in enumerate(vals)]


def _dims(shape: Any) -> tuple[int, ...]:
    return tuple(d if isinstance(d, int) else -1 for d in shape)


register_engine(TorchEngineConfig, TorchEngine)
