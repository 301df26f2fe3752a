"""The ``ppn_bev`` processor: raw LiDAR points in, BEV segmentation or reconstruction out.

A PPN model folder's ``model.yaml``::

    task: bev_segmentation
    engine: {type: onnxruntime}
    processor: {type: ppn_bev, task: seg, mode: multi, frames: 4, resolution: 0.4,
                x_range: [-51.2, 51.2], y_range: [-51.2, 51.2], z_range: [-5.0, 5.0]}

Node-level tensors (CONTRIBUTING.md): input ``points`` FP32 ``[N, 4]`` plus the request
parameter ``sensor_id``; output ``probs`` FP32 ``[C, H, W]`` (``task: seg``) or ``bev`` FP32
``[1, H, W]`` (``task: rec``). Each request's scan is BEV-encoded and pushed into the ring
buffer of its ``sensor_id`` (the last T frames, oldest first; zeros before the stream has T
frames); the stack is the engine input ``[1, T*C, H, W]``. Streams idle beyond ``max_streams``
are forgotten, least recently used first.

On a node whose engine runs on a CUDA device, with torch installed (the ``gpu`` extra), the
scan goes to the GPU once (through a pinned staging buffer), is encoded there
(:func:`~moesaic.datasets.bev.torch_multi_channel`), the ring buffers live on the GPU and the
engine gets the stacked grid as a device tensor: no grid crosses PCIe. ``gpu_encoding: false``
keeps the encoding on the CPU.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.datasets.bev import (
    BevRingBuffer,
    TorchBevRingBuffer,
    torch_multi_channel,
    torch_ppn_occupancy,
)
from moesaic.datasets.lidar_scenes import CLASS_NAMES
from moesaic.models.ppn.encoding import PpnEncoding
from moesaic.runtime.engine import TensorSpec
from moesaic.runtime.processing import Processor, register_processor
from moesaic.runtime.torch_engine import CUDA_GATE

__all__ = ["PpnBevProcessor"]

_OWN_KEYS = {"task", "max_points", "max_streams", "class_names", "gpu_encoding"}


class PpnBevProcessor(Processor):
    """BEV encoding + per-sensor temporal ring buffer around a PPN network."""

    def __init__(self, options: Mapping[str, Any], model_dir: Path) -> None:
        super().__init__(options, model_dir)
        unknown = set(options) - _OWN_KEYS - {"mode", "frames", "resolution", "x_range", "y_range", "z_range"}
        if unknown:
            raise ValueError(f"processor: unknown option(s) {sorted(unknown)} for ppn_bev")
        self.task = options.get("task", "seg")
        if self.task not in ("seg", "rec"):
            raise ValueError(f"processor.task: expected 'seg' or 'rec', got {self.task!r}")
        self.encoding = PpnEncoding.from_options(options)
        self.encoder = self.encoding.encoder()
        self.max_points = int(options.get("max_points", 2_000_000))
        self.max_streams = int(options.get("max_streams", 64))
        self._names = [str(n) for n in options.get("class_names", CLASS_NAMES)]
        self.gpu_encoding = bool(options.get("gpu_encoding", True))
        self._buffers: OrderedDict[str, Any] = OrderedDict()
        self._lock = threading.Lock()
        self._engine_input = "bev"
        self._device: Any = None  # a torch CUDA device once placed there
        self._staging: Any = None  # pinned host buffer the scans go to the GPU through

    def place(self, device: str) -> None:
        """Encode on ``device`` when it is a CUDA device and torch sees it (see the module doc)."""
        if not (self.gpu_encoding and device.startswith("cuda")):
            return
        try:
            import torch
        except ImportError:
            return
        if not torch.cuda.is_available():
            return
        with self._lock:
            self._device = torch.device(device)
            self._buffers.clear()

    @property
    def encodes_on(self) -> str:
        """Where scans are encoded: ``cpu`` or the CUDA device."""
        return "cpu" if self._device is None else str(self._device)

    def inputs(self, engine_inputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        if len(engine_inputs) != 1:
            raise ValueError(
                f"ppn_bev: the engine must take one input, it takes {[s.name for s in engine_inputs]}"
            )
        spec = engine_inputs[0]
        expected = (self.encoding.in_channels, *self.encoding.shape)
        if len(spec.shape) != 4 or any(
            w not in (-1, e) for w, e in zip(spec.shape[1:], expected, strict=True)
        ):
            raise ValueError(
                f"ppn_bev: engine input {spec.name!r} has shape {spec.shape}, "
                f"the encoding gives [1, {expected}]"
            )
        self._engine_input = spec.name
        return (TensorSpec("points", "FP32", (-1, 4)),)

    def outputs(self, engine_outputs: tuple[TensorSpec, ...]) -> tuple[TensorSpec, ...]:
        h, w = self.encoding.shape
        if self.task == "seg":
            return (TensorSpec("probs", "FP32", (len(self._names), h, w)),)
        return (TensorSpec("bev", "FP32", (1, h, w)),)

    def class_names(self) -> list[str]:
        return list(self._names) if self.task == "seg" else []

    def sample_inputs(self) -> dict[str, np.ndarray]:
        """120,000 points spread over the grid's range, about one KITTI scan."""
        rng = np.random.default_rng(0)
        g = self.encoding.grid
        lo = (g.x_range[0], g.y_range[0], g.z_range[0], 0.0)
        hi = (g.x_range[1], g.y_range[1], g.z_range[1], 1.0)
        points = rng.uniform(lo, hi, (120_000, 4)).astype(np.float32)
        return {"points": points}

    def _buffer(self, sensor_id: str) -> Any:
        buf = self._buffers.get(sensor_id)
        if buf is None:
            if self._device is None:
                buf = BevRingBuffer(self.encoding.frames, self.encoder.shape)
            else:
                buf = TorchBevRingBuffer(self.encoding.frames, self.encoder.shape, self._device)
            self._buffers[sensor_id] = buf
            while len(self._buffers) > self.max_streams:
                self._buffers.popitem(last=False)
        else:
            self._buffers.move_to_end(sensor_id)
        return buf

    def preprocess(
        self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[dict[str, np.ndarray], Any]:
        if "points" not in inputs:
            raise ValueError(f"points: missing input; got {sorted(inputs)}")
        points = inputs["points"]
        if points.ndim != 2 or points.shape[1] != 4:
            raise ValueError(f"points: expected shape [N, 4] (x, y, z, intensity), got {list(points.shape)}")
        if points.dtype != np.float32:
            raise ValueError(f"points: expected FP32, got {points.dtype}")
        if points.shape[0] > self.max_points:
            raise ValueError(f"points: {points.shape[0]} points exceed max_points={self.max_points}")
        raw_id = parameters.get("sensor_id", "default")
        sensor_id = raw_id.decode() if isinstance(raw_id, bytes) else str(raw_id)
        if not sensor_id:
            raise ValueError("sensor_id: must be a non-empty string")
        if self._device is not None:
            # Shared only while encoding: the engine takes the gate again for its run, and a load
            # queued in between would deadlock against a gate held across both.
            with self._lock, CUDA_GATE.shared():
                buf = self._buffer(sensor_id)
                buf.push(self._encode_on_gpu(points))
                return {self._engine_input: buf.stacked()[None]}, None
        frame = self.encoder(points)
        with self._lock:
            buf = self._buffer(sensor_id)
            buf.push(frame)
            stacked = buf.stacked()
        return {self._engine_input: stacked[None]}, None

    def _encode_on_gpu(self, points: np.ndarray) -> Any:
        """One scan encoded on the GPU (called under the lock: one staging buffer)."""
        import torch

        n = len(points)
        staging = self._staging
        if staging is None or staging.shape[0] < n:
            staging = self._staging = torch.empty((max(n, 1 << 17), 4), dtype=torch.float32, pin_memory=True)
        host = staging[:n]
        np.copyto(host.numpy(), points)  # the request's read-only bytes into pinned memory
        device_points = host.to(self._device, non_blocking=True)
        if self.encoding.mode == "ppn":
            frame = torch_ppn_occupancy(device_points).to(torch.float32)[None]
        else:
            frame = torch_multi_channel(device_points, self.encoding.grid)
        # The staging buffer is reused by the next scan; its copy is done by then, as the engine
        # waits for torch's stream before its run (and a CPU engine's copy to the host waits too).
        return frame

    def postprocess(self, outputs: Mapping[str, np.ndarray], context: Any) -> dict[str, np.ndarray]:
        (out,) = outputs.values()
        array = np.asarray(out, dtype=np.float32)
        if array.ndim == 4:
            array = array[0]
        name = "probs" if self.task == "seg" else "bev"
        return {name: np.ascontiguousarray(array)}


register_processor("ppn_bev", PpnBevProcessor)
