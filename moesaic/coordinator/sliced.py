"""Sliced detection (request option ``slice=<tile px>``, optional ``overlap=0.2``): the
pipeline variant that fans tiles out instead of experts.

The frame is cut into overlapping tiles (:func:`moesaic.models.detector.slicing.tile_image`).
Workers are, per device, the replica of the best-gated detection expert there, so tiles
spread over nodes (the most energy-hungry devices drop out while the energy budget does not
hold). Each worker pulls tiles from one shared queue, so faster devices take more tiles. A
tile whose worker fails goes back to the queue and that worker stops; the tiles' boxes are
shifted back to frame pixels and merged across tile borders with
:func:`~moesaic.models.detector.slicing.merge_tiles`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING

from moesaic.coordinator.calls import Caller, Run
from moesaic.coordinator.fusion import Fused
from moesaic.coordinator.inputs import RequestInputs, tile_options
from moesaic.coordinator.planner import Plan, Planner
from moesaic.coordinator.registry import Expert, Registry
from moesaic.coordinator.selection import fits
from moesaic.errors import InvalidInput, Unavailable
from moesaic.models.detector.slicing import merge_tiles, tile_image
from moesaic.runtime.detections import Detections

if TYPE_CHECKING:
    from moesaic.coordinator.pipeline import RequestState

__all__ = ["perceive_sliced"]


def _workers(state: RequestState, registry: Registry, planner: Planner) -> list[Expert]:
    """Per device, the replica of the best-gated detection expert there, best first."""
    weights = dict(
        zip(
            (e.id for e in state.experts),
            planner.gate_weights("detection", state.features, state.experts),
            strict=True,
        )
    )
    best: dict[str, tuple[float, Expert]] = {}
    for replica in registry.replicas("detection"):
        w = float(weights.get(replica.model, -1.0))
        if w < 0:
            continue
        if replica.device not in best or w > best[replica.device][0]:
            best[replica.device] = (w, registry.offer(replica))
    return [e for _, e in sorted(best.values(), key=lambda x: (-x[0], x[1].replica.id))]


def _predict(experts: list[Expert], tiles: int, overhead_ms: float) -> tuple[float, float]:
    """Tiles shared in proportion to speed: the time for all devices to finish together."""
    rate = sum(1.0 / max(e.latency_ms, 1e-3) for e in experts)
    latency = tiles / rate + overhead_ms
    energy = sum(e.energy_mj / max(e.latency_ms, 1e-3) for e in experts) / rate * tiles
    return latency, energy


async def perceive_sliced(
    state: RequestState,
    registry: Registry,
    planner: Planner,
    caller: Caller,
    infeasible: Callable[[RequestState], None],
) -> Fused:
    """Plan the tiles over the workers, run them, merge the boxes. ``infeasible`` is the
    pipeline's policy for a plan that does not fit the budget (shed, or run outside it)."""
    request, budget = state.request, state.budget
    image = request.inputs.tensors.get("image")
    if image is None:
        raise InvalidInput("input: sliced detection (option slice) needs an image", reason="bad_option")
    tile, overlap = tile_options(request.options)
    tiles = tile_image(image, tile, overlap)
    overhead = planner.settings.overhead_ms
    # Every device works on the tiles in parallel; when the energy budget does not hold, the
    # devices that spend the most energy per tile leave first (latency only gets worse).
    chosen = _workers(state, registry, planner)
    if not chosen:
        raise Unavailable("sliced detection: no detection expert is up", reason="no_expert")
    while len(chosen) > 1 and not fits(*_predict(chosen, len(tiles), overhead), budget):
        costliest = max(chosen, key=lambda e: (e.energy_mj, e.replica.id))
        fewer = [e for e in chosen if e is not costliest]
        if _predict(fewer, len(tiles), overhead)[1] >= _predict(chosen, len(tiles), overhead)[1]:
            break
        chosen = fewer
    predicted = _predict(chosen, len(tiles), overhead)
    feasible = fits(*predicted, budget)
    state.plan = Plan(tuple(chosen), tuple(1.0 / len(chosen) for _ in chosen), *predicted, feasible)
    state.cheapest = _predict([min(chosen, key=lambda e: e.energy_mj)], len(tiles), overhead)
    if not feasible:
        infeasible(state)
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(tiles)):
        queue.put_nowait(i)
    results: dict[int, Detections] = {}
    class_names = chosen[0].class_names if chosen else ()

    async def worker(expert: Expert) -> None:
        run = Run(expert)
        state.runs.append(run)
        while not queue.empty():
            i = queue.get_nowait()
            outcome = await caller.call(expert, RequestInputs({"image": tiles[i].image}), state.deadline)
            caller.record(run, outcome)
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
        # Every chosen worker failed on some tile: try the remaining detection replicas once each.
        used = {r.expert.replica.id for r in state.runs}
        spare = [registry.offer(r) for r in registry.replicas("detection") if r.id not in used]
        if spare:
            state.fallback = state.fallback or "expert_failed"
        await asyncio.gather(*(worker(e) for e in spare))
    if len(results) < len(tiles):
        errors = "; ".join(f"{r.expert.replica.id}: {r.status} {r.error}" for r in state.runs)
        raise Unavailable(
            f"sliced detection: {len(tiles) - len(results)} of {len(tiles)} tiles failed ({errors})"
        )
    for run in state.runs:
        run.weight = run.tiles / len(tiles)
        if run.tiles and run.status != "ok":
            run.status = "ok"
    return Fused(
        detections=merge_tiles([(tiles[i], results[i]) for i in sorted(results)], iou=0.5, method="nms")
    )
