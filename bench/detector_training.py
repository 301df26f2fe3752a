"""mAP of shipped detector model folders on held-out generated intersection images.

    python bench/detector_training.py --models models/yolo-n models/yolo-n-640 --count 60 --size 320

The held-out images come from a seed the training data never used. Predictions use
conf 0.001 (as COCO-style mAP is computed), scored by pycocotools; latency is the median
wall time of one ``detect`` call (pre-processing, ONNX Runtime, decode + NMS) on this CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moesaic.datasets.coco_metrics import evaluate  # noqa: E402
from moesaic.datasets.intersection import CLASS_NAMES, render_scene  # noqa: E402
from moesaic.models.detector.detector import load_detector  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=[str(REPO / "models" / "yolo-n")])
    ap.add_argument("--count", type=int, default=60)
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--seed", type=int, default=424242)
    ap.add_argument("--notes", default="", help="training details to print under the table")
    ap.add_argument("--out", default="")
    ap.add_argument("--md", default="")
    args = ap.parse_args()
    rng = np.random.default_rng(args.seed)
    scenes = [render_scene(rng, size=args.size) for _ in range(args.count)]
    gts = [s.detections for s in scenes]
    rows, results = [], {}
    for model in args.models:
        with load_detector(Path(model), conf=0.001) as det:
            det.detect(scenes[0].image)
            preds, times = [], []
            for s in scenes:
                t0 = time.perf_counter()
                preds.append(det.detect(s.image))
                times.append((time.perf_counter() - t0) * 1000)
            imgsz = getattr(getattr(det, "processor", None), "imgsz", "?")
        m = evaluate(gts, preds, CLASS_NAMES).as_dict()
        m["ms_per_image"] = statistics.median(times)
        size_mb = sum(f.stat().st_size for f in Path(model).glob("*")) / 1e6
        results[model] = {**m, "imgsz": imgsz, "folder_mb": size_mb}
        pc = m["per_class_mAP50"]
        rows.append(
            f"| `{model}` | {imgsz} | {m['mAP50']:.3f} | {m['mAP50-95']:.3f} | {pc['vehicle']:.3f} | "
            f"{pc['pedestrian']:.3f} | {m['ms_per_image']:.1f} | {size_mb:.1f} |"
        )
    machine = f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (shared with other jobs)"
    text = "\n".join(
        [
            f"Held-out set: {args.count} generated {args.size}x{args.size} frames (seed {args.seed}), "
            f"{sum(len(g) for g in gts)} objects.",
            "",
            "| model folder | input px | mAP50 | mAP50-95 | mAP50 vehicle | mAP50 pedestrian "
            "| ms/image (CPU) | MB |",
            "|---|---|---|---|---|---|---|---|",
            *rows,
            "",
            *([args.notes, ""] if args.notes else []),
            f"Machine: {machine}.",
        ]
    )
    print(text)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.md:
        command = "python bench/detector_training.py " + " ".join(sys.argv[1:])
        Path(args.md).write_text(f"# Detector training\n\nCommand: `{command}`\n\n{text}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
