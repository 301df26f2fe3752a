"""Build a validation table by running real experts on labelled data.

The labelled data is a folder of ``.npz`` files, one per frame. Label arrays are named
``label`` (classification: class id; bev_segmentation: [H, W] class grid), ``bev``
(bev_reconstruction target) or ``boxes`` + ``class_ids`` (detection); every other array is
an input tensor passed to the experts under its name (``points`` FP32 [N, 4], ``image``
UINT8 [H, W, 3], or any tensor such as ``x``). Optional ``sensor_id`` (string array) becomes
the request parameter.

>>> table = asyncio.run(build_validation(config, "detection", Path("labelled/")))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from moesaic.coordinator.config import FleetConfig
from moesaic.coordinator.features import FEATURE_NAMES, features_of, input_kind_of
from moesaic.coordinator.registry import Registry
from moesaic.coordinator.validation import ValidationTable, score_rows

__all__ = ["LABEL_KEYS", "build_validation", "read_frame"]

LABEL_KEYS = frozenset({"label", "bev", "boxes", "class_ids"})
log = logging.getLogger(__name__)


def read_frame(path: Path) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, str]]:
    """(inputs, labels, parameters) of one labelled ``.npz`` frame."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not a readable .npz file: {exc}") from None
    params = {}
    if "sensor_id" in arrays:
        params["sensor_id"] = str(arrays.pop("sensor_id"))
    labels = {k: v for k, v in arrays.items() if k in LABEL_KEYS}
    inputs = {k: v for k, v in arrays.items() if k not in LABEL_KEYS}
    if not labels:
        raise ValueError(f"{path}: no label array (one of {sorted(LABEL_KEYS)})")
    if not inputs:
        raise ValueError(f"{path}: no input array besides the labels")
    return inputs, labels, params


async def build_validation(
    config: FleetConfig, task: str, data: Path, *, timeout_s: float = 60.0, experts: list[str] | None = None
) -> ValidationTable:
    """Run every expert of ``task`` in the fleet on every frame in ``data`` and score it."""
    files = sorted(data.glob("*.npz"))
    if not files:
        raise ValueError(f"{data}: no .npz frames")
    async with Registry(config) as registry:
        pool = registry.experts(task)
        if experts:
            wanted = set(experts)
            pool = [e for e in pool if e.id in wanted]
            missing = wanted - {e.id for e in pool}
            if missing:
                raise LookupError(f"expert {sorted(missing)[0]!r} is not up in the fleet")
        if not pool:
            raise LookupError(f"no expert of task {task!r} is up in the fleet")
        feature_rows: list[np.ndarray] = []
        frame_idx: list[int] = []
        q_rows: list[np.ndarray] = []
        kind = ""
        for f, path in enumerate(files):
            inputs, labels, params = read_frame(path)
            this_kind = input_kind_of(inputs)
            if kind and this_kind != kind:
                raise ValueError(f"{path}: input kind {this_kind!r} differs from earlier frames ({kind!r})")
            kind = this_kind
            columns = []
            for e in pool:
                result = await registry.client(e.replica).infer(
                    e.model, inputs, parameters=params or None, timeout=timeout_s
                )
                columns.append(score_rows(task, result.outputs, labels, seed=f))
            rows = len(columns[0])
            if rows == 0:
                continue  # e.g. a detection frame without objects
            feature_rows.append(features_of(kind, inputs))
            q_rows.append(np.stack(columns, axis=1))
            frame_idx.extend([len(feature_rows) - 1] * rows)
            log.info("%s: %d rows", path.name, rows)
        if not q_rows:
            raise ValueError(f"{data}: no labelled rows (e.g. every frame has no objects)")
        return ValidationTable(
            task=task,
            input_kind=kind,
            experts=tuple(e.id for e in pool),
            feature_names=FEATURE_NAMES[kind],
            features=np.stack(feature_rows),
            frame=np.asarray(frame_idx),
            q=np.clip(np.concatenate(q_rows), 0.0, 1.0),
        )
