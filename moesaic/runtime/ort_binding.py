"""I/O binding of an ONNX Runtime session on a CUDA device: buffers bound once, CUDA graphs.

For each input signature (names, shapes, dtypes, host or device) one set of device buffers is
allocated and bound once. A request then costs one copy per input into its bound buffer (host
to device for numpy arrays, device to device for torch CUDA tensors, e.g. a BEV grid encoded
on the GPU), the run, and one copy of the outputs to the host; outputs are bound on the device
(from ONNX Runtime's arena). With CUDA graphs on (``enable_cuda_graph``), every signature gets
its own graph id: ONNX Runtime captures the graph on the second run of that signature and
replays it after; its outputs are then bound to buffers of the shapes seen on the first run,
so that every address in the graph stays fixed. At most :data:`MAX_SIGNATURES` signatures
keep graphs; others run without one.

>>> # binding = DeviceBinding(onnxruntime, session, output_names, device_id=0, cuda_graph=True)
>>> # outputs = binding.run({"images": tensor})
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = ["MAX_SIGNATURES", "DeviceBinding", "is_torch_cuda"]

MAX_SIGNATURES = 8

Signature = tuple[tuple[str, tuple[int, ...], str, bool], ...]


def is_torch_cuda(value: Any) -> bool:
    """True for a torch tensor on a CUDA device (without importing torch)."""
    return type(value).__module__.startswith("torch") and bool(getattr(value, "is_cuda", False))


class _Bound:
    """One signature's binding: fixed input buffers, outputs bound on the device."""

    def __init__(self, binding: Any, inputs: dict[str, Any], graph_id: int) -> None:
        self.binding = binding
        self.inputs = inputs
        self.outputs: list[Any] = []  # fixed output buffers (CUDA graphs only)
        self.graph_id = graph_id
        self.outputs_fixed = graph_id < 0  # without a graph ONNX Runtime allocates outputs per run
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
        self._input_types = {node.name: node.type for node in session.get_inputs()}

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
            if not bound.outputs_fixed:
                self._fix_outputs(bound, results)
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
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device_id)
        graph_id = -1
        if self._cuda_graph and self._graphs < MAX_SIGNATURES:
            graph_id = self._graphs
            self._graphs += 1
        bound = _Bound(binding, inputs, graph_id)
        if self._cuda_graph:
            options = ort.RunOptions()
            options.add_run_config_entry("gpu_graph_id", str(graph_id))
            bound.run_options = options
        self._bound[signature] = bound
        return bound

    def _fix_outputs(self, bound: _Bound, results: list[np.ndarray]) -> None:
        """After a signature's first run: bind outputs to device buffers of the shapes seen, so
        their addresses stay fixed (a CUDA graph is captured on the next run)."""
        ort, binding = self._ort, bound.binding
        binding.clear_binding_outputs()
        for name, result in zip(self._output_names, results, strict=True):
            buffer = ort.OrtValue.ortvalue_from_shape_and_type(
                list(result.shape), result.dtype, "cuda", self._device_id
            )
            binding.bind_ortvalue_output(name, buffer)
            bound.outputs.append(buffer)  # alive as long as the binding
        bound.outputs_fixed = True


def _numpy_dtype(tensor: Any) -> np.dtype[Any]:
    """numpy dtype of a torch tensor's element type."""
    name = str(tensor.dtype).removeprefix("torch.")
    aliases = {"half": "float16", "float": "float32", "double": "float64"}
    return np.dtype(aliases.get(name, name))
