"""Train the two large (GPU-class, PPN-sized) experts, score them against baselines, export them.

The networks are bench/ppn_parallel.py's: the segmentation U-Net (31.0 M parameters) and the
reconstruction encoder-decoder at width 64 (27.9 M), on the same input, 16 x 1024 x 1024:
four-channel BEV (height max/mean, intensity, density), 0.1 m cells over ±51.2 m, T = 4
stacked frames. Training takes random 256 x 256 crops; the held-out sequence (the last, a
track never seen in training) is scored on whole grids, next to the constant baselines
(all ``empty`` for segmentation, an all-zero map for reconstruction).

Data: labelled sequences made here (the generator needs open3d, the GPU host has none)::

    moesaic generate-lidar --out .ppn-data --sequences 6 --frames 14 --sensors 32x512,16x1024 --seed 100

(26 MB, git-ignored; carry it to the GPU host). Then, with torch + numpy + pyyaml + onnx only::

    python3 bench/ppn_train_large.py --data .ppn-data --export runs/ppn-large --out $OUT/ppn_train_large.json

writes ``runs/ppn-large/torch/ppn-{seg,rec}-large`` (``torch.export`` program, PyTorch engine
with CUDA graphs) and ``runs/ppn-large/onnx/ppn-{seg,rec}-large`` (ONNX Runtime), each with a
``model.yaml`` a node serves: ``moesaic node --models runs/ppn-large/torch --device cuda:0``.
The weights (~120 MB a network) are not committed: this command builds them.

    python bench/ppn_train_large.py --data .ppn-data --quick --export /tmp/ppn-q   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.record import write_results  # noqa: E402
from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.training import (  # noqa: E402
    TrainConfig,
    load_samples,
    train,
    write_model_folder,
)

#: bench/ppn_parallel.py's input, 16 x 1024 x 1024, as four-channel BEV frames.
LARGE_ENCODING = {
    "mode": "multi",
    "frames": 4,
    "resolution": 0.1,
    "x_range": [-51.2, 51.2],
    "y_range": [-51.2, 51.2],
    "z_range": [-5.0, 5.0],
}
ENGINES = ("torch", "onnxruntime")
FOLDERS = {"torch": "torch", "onnxruntime": "onnx"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT / ".ppn-data"), help="folder of sequences")
    parser.add_argument("--out", default=None, help="JSON file to write (with command, commit, machine)")
    parser.add_argument(
        "--export", default=None, help="folder to write torch/ and onnx/ model repositories into"
    )
    parser.add_argument("--tasks", default="seg,rec", help="experts to train, comma-separated")
    parser.add_argument("--size", default="large", choices=("large", "small"))
    parser.add_argument("--steps", type=int, default=3000, help="optimiser steps per expert (at most)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument(
        "--max-seconds",
        type=float,
        default=100.0,
        help="training time per expert: fewer steps when the first ones show --steps would not fit",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="3 steps of the small networks (CPU smoke run)")
    args = parser.parse_args()
    encoding = PpnEncoding.from_options(LARGE_ENCODING)
    tasks = args.tasks.split(",")
    if set(tasks) - {"seg", "rec"}:
        parser.error(f"--tasks: expected seg and/or rec, got {args.tasks!r}")
    if args.quick:
        args.steps, args.batch, args.crop, args.size = 3, 1, 64, "small"
    cuda = args.device.startswith("cuda")
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "torch": torch.__version__,
        "encoding": encoding.to_options(),
        "input": [1, encoding.in_channels, *encoding.shape],
        "size": args.size,
    }
    base = TrainConfig(data=Path(args.data), size=args.size, encoding=encoding)
    t0 = time.perf_counter()
    samples = load_samples(base)
    results["data_seconds"] = round(time.perf_counter() - t0, 1)
    print(f"data: {len(samples[0])} training + {len(samples[1])} held-out frames, "
          f"encoded in {results['data_seconds']} s", flush=True)  # fmt: skip
    for task in tasks:
        config = TrainConfig(
            data=Path(args.data),
            task=task,
            size=args.size,
            encoding=encoding,
            steps=args.steps,
            batch=args.batch,
            crop=args.crop,
            lr=args.lr,
            device=args.device,
            threads=4,
            max_seconds=args.max_seconds,
        )
        t0 = time.perf_counter()

        def progress(step: int, total: int, loss: float, task: str = task, t0: float = t0) -> None:
            if step % max(1, total // 10) == 0:
                print(
                    f"{task} step {step}/{total} loss {loss:.4f} ({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )

        result = train(config, progress, samples=samples)
        entry: dict[str, object] = {
            "metrics": result.metrics,
            "baseline": result.baseline,
            "parameters": result.parameters,
            "train_seconds": round(result.seconds, 1),
            "ms_per_step": round(1e3 * result.seconds / max(result.steps_done, 1), 2),
            "steps": result.steps_done,
            "batch": args.batch,
            "crop": args.crop,
            "train_frames": result.train_frames,
            "val_frames": result.val_frames,
            "final_loss": sum(result.history[-20:]) / len(result.history[-20:]),
        }
        key = "miou" if task == "seg" else "mae"
        print(f"{task}: {result.parameters / 1e6:.1f} M params, {result.steps_done} steps in "
              f"{result.seconds:.0f} s; held-out {key} {result.metrics[key]:.4f} "
              f"(baseline {result.baseline[key]:.4f}); {json.dumps(result.metrics)}", flush=True)  # fmt: skip
        if args.export:
            t1 = time.perf_counter()
            exported: dict[str, str] = {}
            for engine in ENGINES:
                folder = Path(args.export) / FOLDERS[engine] / f"ppn-{task}-{args.size}"
                try:  # one exporter failing must not lose the other, nor the trained metrics
                    write_model_folder(folder, result, config, command=" ".join(sys.argv), engine=engine)  # type: ignore[arg-type]
                except Exception as exc:  # recorded in the JSON
                    exported[engine] = f"failed: {type(exc).__name__}: {exc}"
                    print(f"{engine} export of {task} failed: {exc!r}", flush=True)
                    continue
                exported[engine] = str(folder)
                print(f"wrote {folder}", flush=True)
            entry["exported"] = exported
            entry["export_seconds"] = round(time.perf_counter() - t1, 1)
        entry["total_seconds"] = round(time.perf_counter() - t0, 1)
        results[task] = entry
        if args.out:  # after each expert: a run cut short keeps what it finished
            write_results("ppn_train_large", results, out=Path(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
