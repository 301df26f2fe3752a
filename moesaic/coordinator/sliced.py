"""Sliced detection fan-out (request option ``slice=<tile px>``, optional ``overlap=0.2``).

The frame is cut into overlapping tiles (:func:`moesaic.models.detector.slicing.tile_image`).
The detector experts used are the best-gated expert on each device, so tiles spread over
nodes (the most energy-hungry devices drop out while the energy budget does not hold). Each
expert pulls tiles from one shared queue, so faster devices take more tiles. A tile whose
expert fails goes back to the queue and that expert is dropped; the tiles' boxes are shifted
back to frame pixels and merged across tile borders with
:func:`~moesaic.models.detector.slicing.merge_tiles`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import numpy as np

from moesaic.coordinator.fusion import Fused
from moesaic.coordinator.inputs import RequestInputs, tile_options
from moesaic.coordinator.selection import Budget, fits
from moesaic.errors import InvalidInput, Unavailable
from moesaic.models.detections import Detections

if TYPE_CHECKING:
    from moesaic.coordinator.core import Coordinator, PerceiveInput, Perception
    from moesaic.coordinator.registry import Expert

__all__ = ["sliced_perceive"]


def _spread(coordinator: Coordinator, features: np.ndarray | None) -> list[Expert]:
    """The best-gated detection expert of every device, best first."""
    cands = coordinator.planner.candidates("detection")
    weights = coordinator.planner.gate_weights("detection", features, cands)
    best: dict[str, tuple[float, Expert]] = {}
    for e, w in zip(cands, weights, strict=True):
        if e.device not in best or w > best[e.device][0]:
            best[e.device] = (float(w), e)
    return [e for _, e in sorted(best.values(), key=lambda x: (-x[0], x[1].id))]


def _predict(experts: list[Expert], tiles: int, overhead_ms: float) -> tuple[float, float]:
    """Tiles shared in proportion to speed: the time for all devices to finish together."""
    rate = sum(1.0 / max(e.latency_ms, 1e-3) for e in experts)
    latency = tiles / rate + overhead_ms
    energy = sum(e.energy_mj / max(e.latency_ms, 1e-3) for e in experts) / rate * tiles
    return latency, energy


async def sliced_perceive(
    coordinator: Coordinator,
    request: PerceiveInput,
    budget: Budget,
    features: np.ndarray | None,
    start: float,
) -> Perception:
    from moesaic.coordinator.core import Run
    from moesaic.models.detector.slicing import merge_tiles, tile_image

    image = request.inputs.tensors.get("image")
    if image is None:
        raise InvalidInput("input: sliced detection (option slice) needs an image", reason="bad_option")
    tile, overlap = tile_options(request.options)
    tiles = tile_image(image, tile, overlap)
    experts = _spread(coordinator, features)
    overhead = coordinator.settings.overhead_ms
    # Every device works on the tiles in parallel; when the energy budget does not hold, the
    # devices that spend the most energy per tile leave first (latency only gets worse).
    chosen = list(experts)
    while len(chosen) > 1 and not fits(*_predict(chosen, len(tiles), overhead), budget):
        costliest = max(chosen, key=lambda e: (e.energy_mj, e.id))
        fewer = [e for e in chosen if e is not costliest]
        if _predict(fewer, len(tiles), overhead)[1] >= _predict(chosen, len(tiles), overhead)[1]:
            break
        chosen = fewer
    predicted = _predict(chosen, len(tiles), overhead)
    plan_ok = fits(*predicted, budget)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(tiles)):
        queue.put_nowait(i)
    results: dict[int, Detections] = {}
    runs = {e.id: Run(e, weight=0.0) for e in chosen}
    class_names = chosen[0].class_names if chosen else ()

    async def worker(expert: Expert) -> None:
        run = runs[expert.id]
        while not queue.empty():
            i = queue.get_nowait()
            now = time.monotonic()
            deadline = coordinator._deadline(expert, now, start, budget, False, request.deadline)
            outcome = await coordinator.call(expert, RequestInputs({"image": tiles[i].image}), deadline - now)
            coordinator.record(expert, run, outcome)
            if outcome.result is None:
                queue.put_nowait(i)
                return
            out = outcome.result.outputs
            try:
                results[i] = Detections(out["boxes"], out["scores"], out["class_ids"], class_names)
            except (KeyError, ValueError) as exc:
                run.status, run.error = "error", f"bad detector output: {exc}"
                queue.put_nowait(i)
                return
            run.tiles += 1

    await asyncio.gather(*(worker(e) for e in chosen))
    if len(results) < len(tiles):
        # Every chosen expert failed on some tile: try the remaining detection experts once each.
        spare = [e for e in coordinator.planner.candidates("detection") if e.id not in runs]
        for e in spare:
            runs[e.id] = Run(e)
        plan_ok = plan_ok and not spare
        await asyncio.gather(*(worker(e) for e in spare))
    if len(results) < len(tiles):
        errors = "; ".join(f"{r.expert.id}: {r.status} {r.error}" for r in runs.values())
        raise Unavailable(
            f"sliced detection: {len(tiles) - len(results)} of {len(tiles)} tiles failed ({errors})"
        )
    for run in runs.values():
        run.weight = run.tiles / len(tiles)
        if run.tiles and run.status != "ok":
            run.status = "ok"
    merged = merge_tiles([(tiles[i], results[i]) for i in sorted(results)], iou=0.5, method="nms")
    return coordinator.finish(
        request, list(runs.values()), Fused(detections=merged), budget, start, plan_ok, predicted
    )
