"""Coordinator replies as the JSON (and PNG) published on ``moesaic/v1/results/...``.

The JSON of one result::

    {"sensor": "s0", "task": "detection", "frame_id": 7, "timestamp": 1718000000.1,
     "request_id": "...", "experts": [{"id": "yolo-n", "node": "n0", "model": "yolo-n",
     "weight": 1.0, "latency_ms": 31.2, "energy_mj": 410.0, "energy_measured": false,
     "status": "ok"}], "latency_ms": 35.1, "predicted_latency_ms": 33.0,
     "energy_mj": 410.0, "predicted_energy_mj": 400.0, "energy_source": "estimate",
     "budget": {"latency_ms": 150.0, "energy_mj": 0.0}, "budget_met": true,
     "budget_reason": "", "feasible": true, "cheapest": {"latency_ms": 20.0, "energy_mj": 150.0},
     "bridge_ms": 36.0, "output": {"type": "detections", "items": [...]}}

``budget`` is the budget the coordinator applied; ``budget_reason`` says why ``budget_met`` is
false (``no_feasible_set``, ``expert_failed``, ``deadline_missed``, ``energy_over``);
``feasible`` is whether its prediction admitted any expert set; ``cheapest`` is the cheapest
single expert's predicted cost. ``output`` is
``{"type": "detections", "items": [{"xyxy": [...], "score", "class_id", "class_name"}]}``,
``{"type": "segmentation", "shape": [H, W], "class_pixels": {"0": 1200, ...}}``,
``{"type": "grid", "shape": [...], "min", "max", "mean", "nonzero"}`` or ``{"type": "text", "text"}``.
"""

from __future__ import annotations

import io
import json
from typing import Any

import numpy as np

from moesaic.datasets.bev import bev_image
from moesaic.ingest.payloads import Frame
from moesaic.proto import moesaic_pb2
from moesaic.runtime.engine import dtype_of

__all__ = ["grid_array", "grid_png", "output_json", "result_json", "segmentation_classes"]

# Distinct colours for class ids 0..15 (0, background, is dark grey); wraps after that.
_PALETTE = np.array(
    [
        [30, 30, 30], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
        [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128],
        [220, 190, 255], [170, 110, 40], [255, 250, 200], [128, 0, 0],
    ],
    dtype=np.uint8,
)  # fmt: skip


def grid_array(tensor: moesaic_pb2.Tensor) -> np.ndarray:
    """The numpy array of a reply tensor; ``ValueError`` when its size does not match its shape."""
    dtype = dtype_of(tensor.datatype)
    shape = tuple(int(d) for d in tensor.shape)
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise ValueError(
            f"tensor {tensor.name!r}: {len(tensor.data)} bytes for shape {shape} {tensor.datatype}"
        )
    return np.frombuffer(tensor.data, dtype=dtype).reshape(shape)


def segmentation_classes(array: np.ndarray) -> np.ndarray | None:
    """The class map ``[H, W]`` of a segmentation grid (a class map, or ``[C, H, W]`` scores); else None."""
    if array.ndim == 2 and array.dtype.kind in "ui":
        return array
    if array.ndim == 3 and array.shape[0] > 1 and array.dtype.kind == "f":
        return np.argmax(array, axis=0).astype(np.uint8)
    if array.ndim == 3 and array.shape[0] == 1 and array.dtype.kind in "ui":
        return array[0]
    return None


def output_json(response: moesaic_pb2.PerceiveResponse) -> dict[str, Any]:
    """The ``output`` member of a result's JSON."""
    which = response.WhichOneof("output")
    if which == "detections":
        return {
            "type": "detections",
            "items": [
                {
                    "xyxy": [round(float(v), 2) for v in d.xyxy],
                    "score": round(float(d.score), 4),
                    "class_id": int(d.class_id),
                    "class_name": d.class_name,
                }
                for d in response.detections.items
            ],
        }
    if which == "text":
        return {"type": "text", "text": response.text}
    if which == "grid":
        array = grid_array(response.grid)
        classes = segmentation_classes(array)
        if classes is not None:
            ids, counts = np.unique(classes, return_counts=True)
            return {
                "type": "segmentation",
                "shape": list(classes.shape),
                "class_pixels": {str(int(i)): int(c) for i, c in zip(ids, counts, strict=True)},
            }
        values = array.astype(np.float32, copy=False)
        return {
            "type": "grid",
            "shape": list(array.shape),
            "min": float(values.min()) if values.size else 0.0,
            "max": float(values.max()) if values.size else 0.0,
            "mean": float(values.mean()) if values.size else 0.0,
            "nonzero": int(np.count_nonzero(values > 0.5)),
        }
    return {"type": "none"}


def result_json(
    frame: Frame, response: moesaic_pb2.PerceiveResponse, budget: moesaic_pb2.Budget, *, bridge_ms: float
) -> bytes:
    """The UTF-8 JSON published on ``results/{sensor}/{task}``; ``budget``: the one sent (the
    coordinator's reply names the one it applied, which wins when set)."""
    applied = response.budget if response.HasField("budget") else budget
    body = {
        "sensor": frame.sensor_id,
        "kind": frame.kind,
        "task": response.task,
        "frame_id": frame.frame_id,
        "timestamp": frame.timestamp,
        "request_id": response.request_id,
        "experts": [
            {
                "id": e.expert_id,
                "node": e.node,
                "model": e.model,
                "weight": round(e.weight, 4),
                "latency_ms": round(e.latency_ms, 3),
                "energy_mj": round(e.energy_mj, 3),
                "energy_measured": e.energy_measured,
                "status": e.status,
                **({"error": e.error} if e.error else {}),
            }
            for e in response.experts
        ],
        "latency_ms": round(response.measured_latency_ms, 3),
        "predicted_latency_ms": round(response.predicted_latency_ms, 3),
        "energy_mj": round(response.measured_energy_mj, 3),
        "predicted_energy_mj": round(response.predicted_energy_mj, 3),
        "energy_source": "measured" if response.energy_measured else "estimate",
        "budget": {"latency_ms": applied.latency_ms, "energy_mj": applied.energy_mj},
        "budget_met": response.budget_met,
        "budget_reason": response.budget_reason,
        "feasible": response.feasible,
        "cheapest": {
            "latency_ms": round(response.cheapest_latency_ms, 3),
            "energy_mj": round(response.cheapest_energy_mj, 3),
        },
        "bridge_ms": round(bridge_ms, 3),
        "output": output_json(response),
    }
    return json.dumps(body, separators=(",", ":")).encode()


def grid_png(response: moesaic_pb2.PerceiveResponse) -> bytes | None:
    """A PNG of a grid result (palette colours per class, or greyscale 0..1), None for other outputs.

    Grids are ``[ix, iy]`` BEV cells; the picture has the one BEV orientation of
    :func:`~moesaic.datasets.bev.bev_image` (forward up, left on the left), as ``moesaic bev``.
    """
    if response.WhichOneof("output") != "grid":
        return None
    from PIL import Image

    array = grid_array(response.grid)
    classes = segmentation_classes(array)
    if classes is not None:
        rgb = _PALETTE[bev_image(classes).astype(np.int64) % len(_PALETTE)]
        image = Image.fromarray(rgb, "RGB")
    else:
        plane = (
            array.reshape(array.shape[-2:])
            if array.ndim >= 2 and array.size == np.prod(array.shape[-2:])
            else None
        )
        if plane is None:
            return None
        scaled = np.clip(bev_image(plane).astype(np.float32), 0.0, 1.0) * 255.0
        image = Image.fromarray(scaled.astype(np.uint8), "L")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=1)
    return buffer.getvalue()
