"""Sliced detection: small-object recall with vs without slicing, and tiles over 2 nodes vs 1.

    python bench/sliced_detection.py --model models/yolo-n --frames 8 --frame-size 960 --tile 320

1. Accuracy: generated high-camera frames (``frame-size`` pixels, vehicles 14-30 px long,
   pedestrians 4-8 px) detected (a) whole, letterboxed down to the model's input, and (b) in
   overlapping ``tile``-pixel tiles merged by NMS (and WBF). mAP50 and recall at IoU 0.5 per
   class come from pycocotools.
2. Speed: two real node processes (``moesaic node``, ONNX Runtime with one intra-op thread
   each, i.e. one CPU core per node) serve the model; the tiles of each frame are pulled from
   one shared queue by one worker per node (as the coordinator's sliced fan-out does), over
   gRPC on loopback. Wall time per frame with 2 nodes vs 1 node.

Prints a table and writes JSON to ``--out`` and markdown to ``--md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moesaic.datasets.coco_metrics import evaluate  # noqa: E402
from moesaic.datasets.intersection import CLASS_NAMES, render_scene  # noqa: E402
from moesaic.models.detector.detector import load_detector  # noqa: E402
from moesaic.models.detector.slicing import Tile, merge_tiles, sliced_detect, tile_image  # noqa: E402
from moesaic.runtime.detections import Detections  # noqa: E402


def accuracy(model: Path, frames: list[Any], tile: int, conf: float) -> dict[str, dict[str, Any]]:
    gts = [f.detections for f in frames]
    out: dict[str, dict[str, Any]] = {}
    with load_detector(model, conf=conf) as det:
        runs: dict[str, list[Detections]] = {"full frame": [], "sliced (nms)": [], "sliced (wbf)": []}
        for f in frames:
            runs["full frame"].append(det.detect(f.image))
            runs["sliced (nms)"].append(sliced_detect(det.detect, f.image, tile, overlap=0.2, method="nms"))
            runs["sliced (wbf)"].append(sliced_detect(det.detect, f.image, tile, overlap=0.2, method="wbf"))
    for name, preds in runs.items():
        out[name] = evaluate(gts, preds, CLASS_NAMES).as_dict()
    return out


def _node_repo(model: Path, root: Path) -> str:
    folder = root / "models" / "det"
    shutil.copytree(model, folder)
    spec = yaml.safe_load((folder / "model.yaml").read_text())
    spec["name"] = "det"
    spec["engine"] = {**spec.get("engine", {}), "intra_op_threads": 1, "inter_op_threads": 1}
    (folder / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return "det"


async def _fan_out(clients: list[Any], name: str, tiles: list[Tile]) -> Detections:
    queue: asyncio.Queue[Tile] = asyncio.Queue()
    for t in tiles:
        queue.put_nowait(t)
    results: list[tuple[Tile, Detections]] = []

    async def worker(client: Any) -> None:
        while not queue.empty():
            t = queue.get_nowait()
            r = await client.infer(name, {"image": np.ascontiguousarray(t.image)}, timeout=30)
            o = r.outputs
            results.append((t, Detections(o["boxes"], o["scores"], o["class_ids"], CLASS_NAMES)))

    await asyncio.gather(*(worker(c) for c in clients))
    return merge_tiles(results, iou=0.5)


async def _time_nodes(
    addresses: list[str], name: str, frames: list[Any], tile: int, repeat: int
) -> list[float]:
    from moesaic.nodes.client import NodeClient

    clients = [NodeClient(a) for a in addresses]
    for c in clients:
        await c.__aenter__()
    try:
        for c in clients:
            await c.ready(timeout=30)
        await _fan_out(clients, name, tile_image(frames[0].image, tile))  # warm-up
        times = []
        for _ in range(repeat):
            for f in frames:
                t0 = time.perf_counter()
                await _fan_out(clients, name, tile_image(f.image, tile))
                times.append((time.perf_counter() - t0) * 1000)
        return times
    finally:
        for c in clients:
            await c.__aexit__(None, None, None)


def speed(model: Path, frames: list[Any], tile: int, repeat: int) -> dict[str, Any]:
    from tests.helpers.nodes import node_process

    with tempfile.TemporaryDirectory() as tmp:
        name = _node_repo(model, Path(tmp))
        env = {"OMP_NUM_THREADS": "1"}
        with (
            node_process(Path(tmp) / "models", env=env) as (_, a1),
            node_process(Path(tmp) / "models", env=env) as (_, a2),
        ):
            one = asyncio.run(_time_nodes([a1], name, frames, tile, repeat))
            two = asyncio.run(_time_nodes([a1, a2], name, frames, tile, repeat))
    return {
        "tiles_per_frame": len(tile_image(frames[0].image, tile)),
        "one_node_ms": statistics.median(one),
        "two_nodes_ms": statistics.median(two),
        "speedup": statistics.median(one) / statistics.median(two),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "yolo-n"))
    ap.add_argument("--frames", type=int, default=8)
    ap.add_argument("--frame-size", type=int, default=960)
    ap.add_argument("--tile", type=int, default=320)
    ap.add_argument("--conf", type=float, default=0.1)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-speed", action="store_true", help="accuracy only (no node processes)")
    ap.add_argument("--out", default="", help="write JSON here")
    ap.add_argument("--md", default="", help="write a markdown table here")
    args = ap.parse_args()
    rng = np.random.default_rng(123)
    frames = [
        render_scene(rng, size=args.frame_size, vehicles=(10, 30), pedestrians=(15, 40))
        for _ in range(args.frames)
    ]
    model = Path(args.model)
    acc = accuracy(model, frames, args.tile, args.conf)
    spd = None if args.skip_speed else speed(model, frames, args.tile, args.repeat)
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (shared)"
    lines = [
        f"Model `{model}`; {args.frames} generated {args.frame_size}x{args.frame_size} frames "
        f"({sum(len(f.detections) for f in frames)} objects), tile {args.tile}, overlap 0.2, "
        f"conf {args.conf}.",
        "",
        "| inference | mAP50 | recall50 vehicle | recall50 pedestrian | mAP50 pedestrian |",
        "|---|---|---|---|---|",
    ]
    for name, m in acc.items():
        r, p = m["per_class_recall50"], m["per_class_mAP50"]
        cells = [m["mAP50"], r.get("vehicle", 0), r.get("pedestrian", 0), p.get("pedestrian", 0)]
        lines.append(f"| {name} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    base = acc["full frame"]["per_class_recall50"].get("pedestrian", 0.0)
    sliced = acc["sliced (nms)"]["per_class_recall50"].get("pedestrian", 0.0)
    lines.append("")
    lines.append(f"Pedestrian recall50 sliced / full frame: {sliced:.3f} / {base:.3f}")
    if spd:
        lines += [
            "",
            "| tiles per frame | 1 node ms/frame | 2 nodes ms/frame | speedup (target >= 1.7x) |",
            "|---|---|---|---|",
            f"| {spd['tiles_per_frame']} | {spd['one_node_ms']:.1f} | {spd['two_nodes_ms']:.1f} "
            f"| {spd['speedup']:.2f}x |",
        ]
    lines.append("")
    lines.append(f"Machine: {machine}.")
    text = "\n".join(lines)
    print(text)
    result = {"accuracy": acc, "speed": spd, "args": vars(args), "machine": machine}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))
    if args.md:
        command = "python bench/sliced_detection.py " + " ".join(sys.argv[1:])
        Path(args.md).write_text(f"# Sliced detection\n\nCommand: `{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
