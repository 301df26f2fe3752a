"""I/O binding of an ONNX Runtime session on a CUDA device: buffers bound once, CUDA graphs.

For each input signature (names, shapes, dtypes, host or device) one set of device buffers is
allocated and bound once. A request then costs one copy per input into its bound buffer (host
to device for numpy arrays, device to device for torch CUDA tensors, e.g. a BEV grid encoded
on the GPU), the run, and one copy of the outputs to the host; outputs are bound on the device
(from ONNX Runtime's arena). With CUDA graphs on (``enable_cuda_graph``), every signature gets
its own graph id and its outputs are bound, before its first run, to buffers of the shapes the
graph declares (symbolic dimensions resolved from the inputs' sizes): ONNX Runtime captures the
graph on that first run and replays it after, reading and writing the same addresses. A
signature whose output shapes cannot be resolved, or beyond :data:`MAX_SIGNATURES`, runs
without a graph.

>>> # binding = DeviceBinding(onnxruntime, session, output_names, device_id=0, cuda_graph=True)
>>> # outputs = binding.run({"images": tensor})
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from moesaic.runtime.engine import EngineError, dtype_of

__all__ = ["MAX_SIGNATURES", "DeviceBinding", "is_torch_cuda", "ort_datatype"]

MAX_SIGNATURES = 8

Signature = tuple[tuple[str, tuple[int, ...], str, bool], ...]


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


def is_torch_cuda(value: Any) -> bool:
    """True for a torch tensor on a CUDA device (without importing torch)."""
    return type(value).__module__.startswith("torch") and bool(getattr(value, "is_cuda", False))


class _Bound:
    """One signature's binding: fixed input buffers, outputs bound on the device."""

    def __init__(self, binding: Any, inputs: dict[str, Any], outputs: list[Any], graph_id: int) -> None:
        self.binding = binding
        self.inputs = inputs
        self.outputs = outputs  # fixed output buffers (CUDA graphs only), alive with the binding
        self.graph_id = graph_id
        self.run_options: Any = None


class DeviceBinding:
    """Runs a CUDA (or TensorRT) session through I/O bindings kept per input signature."""

    def __init__(
        self, ort: Any, session: Any, output_names: list[str], *, device_id: int, cuda_graph: bool
    ) -> None:
        self._ort = ort
        self._session = session
        self._output_names = output_names
        self._device_id = device_id
        self._cuda_graph = cuda_graph
        self._bound: dict[Signature, _Bound] = {}
        self._graphs = 0
        self._lock = threading.Lock()
        self._input_dims = {node.name: list(node.shape or ()) for node in session.get_inputs()}
        self._output_meta = {node.name: (list(node.shape or ()), node.type) for node in session.get_outputs()}

    @property
    def cuda_graph(self) -> bool:
        """True when runs capture and replay CUDA graphs."""
        return self._cuda_graph

    @property
    def graphs(self) -> int:
        """CUDA graph ids handed out so far (one per input signature)."""
        return self._graphs

    def run(self, feed: Mapping[str, Any]) -> dict[str, np.ndarray]:
        signature: Signature = tuple(
            (name, tuple(value.shape), str(value.dtype), is_torch_cuda(value)) for name, value in feed.items()
        )
        with self._lock:
            bound = self._bound.get(signature)
            if bound is None:
                bound = self._bind(signature, feed)
            torch_inputs = False
            for name, value in feed.items():
                buffer = bound.inputs[name]
                if is_torch_cuda(value):
                    buffer.copy_(value)
                    torch_inputs = True
                else:
                    buffer.update_inplace(np.ascontiguousarray(value))  # cudaMemcpy: synchronous
            if torch_inputs:  # ONNX Runtime runs on its own stream: let torch's copies finish first
                import torch

                torch.cuda.current_stream().synchronize()
            self._session.run_with_iobinding(bound.binding, bound.run_options)
            results = bound.binding.copy_outputs_to_cpu()
        return dict(zip(self._output_names, results, strict=True))

    def _bind(self, signature: Signature, feed: Mapping[str, Any]) -> _Bound:
        ort = self._ort
        if len(self._bound) >= MAX_SIGNATURES:
            # Drop the oldest signature's buffers; a captured graph of it stays with ONNX Runtime,
            # so graph ids are never reused and new signatures beyond the limit run without one.
            self._bound.pop(next(iter(self._bound)))
        binding = self._session.io_binding()
        inputs: dict[str, Any] = {}
        for name, value in feed.items():
            if is_torch_cuda(value):
                import torch

                buffer = torch.empty_like(value, memory_format=torch.contiguous_format)
                binding.bind_input(
                    name,
                    "cuda",
                    buffer.device.index or 0,
                    _numpy_dtype(value),
                    list(buffer.shape),
                    buffer.data_ptr(),
                )
            else:
                array = np.asarray(value)
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                    list(array.shape), array.dtype, "cuda", self._device_id
                )
                binding.bind_ortvalue_input(name, buffer)
            inputs[name] = buffer
        shapes = self._output_shapes(feed) if self._cuda_graph and self._graphs < MAX_SIGNATURES else None
        outputs: list[Any] = []
        graph_id = -1
        if shapes is None:  # ONNX Runtime allocates the outputs on the device, run by run
            for name in self._output_names:
                binding.bind_output(name, "cuda", self._device_id)
        else:  # fixed outputs, bound before the first run: the graph captured then writes there
            for name, shape in zip(self._output_names, shapes, strict=True):
                dtype = dtype_of(ort_datatype(self._output_meta[name][1]))
                buffer = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, "cuda", self._device_id)
                binding.bind_ortvalue_output(name, buffer)
                outputs.append(buffer)
            graph_id = self._graphs
            self._graphs += 1
        bound = _Bound(binding, inputs, outputs, graph_id)
        if self._cuda_graph:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            bound.run_options = options
        self._bound[signature] = bound
        return bound

    def _output_shapes(self, feed: Mapping[str, Any]) -> list[list[int]] | None:
        """Output shapes for these inputs: fixed dims, or symbolic ones an input dim names; None
        when some output dim depends on the data (no graph then)."""
        sizes: dict[str, int] = {}
        for name, value in feed.items():
            for dim, size in zip(self._input_dims.get(name, ()), value.shape, strict=False):
                if isinstance(dim, str):
                    sizes[dim] = int(size)
        shapes = []
        for name in self._output_names:
            shape = []
            for dim in self._output_meta[name][0]:
                if isinstance(dim, int) and dim >= 0:
                    shape.append(dim)
                elif isinstance(dim, str) and dim in sizes:
                    shape.append(sizes[dim])
                else:
                    return None
            shapes.append(shape)
        return shapes


def _numpy_dtype(tensor: Any) -> np.dtype[Any]:
    """numpy dtype of a torch tensor's element type."""
    name = str(tensor.dtype).removeprefix("torch.")
    aliases = {"half": "float16", "float": "float32", "double": "float64"}
    return np.dtype(aliases.get(name, name))
