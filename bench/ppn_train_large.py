"""Train the two large (GPU-class, PPN-sized) experts on a GPU and report held-out metrics.

Data: sequences made on a host with open3d (the GPU host needs none), e.g.::

    moesaic generate-lidar --out ppn-data --sequences 4 --frames 25 --sensors 32x1024,32x512 --seed 100

then on the GPU host (torch + numpy + pyyaml only)::

    python bench/ppn_train_large.py --data ppn-data --out $OUT/ppn_train_large.json [--export $OUT/models]

The last sequence is held out. Encoding: four channels, 0.2 m cells, 512 x 512 (±51.2 m),
T = 8 frames (32 input channels); training on random 256 x 256 crops, evaluation on whole grids.
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

from moesaic.models.ppn.encoding import PpnEncoding  # noqa: E402
from moesaic.models.ppn.training import TrainConfig, train, write_model_folder  # noqa: E402

LARGE_ENCODING = {
    "mode": "multi",
    "frames": 8,
    "resolution": 0.2,
    "x_range": [-51.2, 51.2],
    "y_range": [-51.2, 51.2],
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", required=True, help="folder of sequences (moesaic generate-lidar --sequences N)"
    )
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument(
        "--export", default=None, help="folder to write ppn-seg-large/ and ppn-rec-large/ into"
    )
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny run (CPU smoke test)")
    args = parser.parse_args()
    encoding = PpnEncoding.from_options(LARGE_ENCODING)
    size = "large"
    if args.quick:
        args.steps, args.batch, args.crop, size = 3, 1, 64, "small"
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "encoding": encoding.to_options(),
    }
    for task in ("seg", "rec"):
        config = TrainConfig(
            data=Path(args.data),
            task=task,  # type: ignore[arg-type]
            size=size,
            encoding=encoding,
            steps=args.steps,
            batch=args.batch,
            crop=args.crop,
            device=args.device,
            threads=4,
        )
        t0 = time.perf_counter()

        def progress(step: int, total: int, loss: float, task: str = task) -> None:
            if step % max(1, total // 10) == 0:
                print(f"{task} step {step}/{total} loss {loss:.4f}", flush=True)

        result = train(config, progress)
        results[task] = {
            "metrics": result.metrics,
            "parameters": result.parameters,
            "train_seconds": result.seconds,
            "total_seconds": time.perf_counter() - t0,
            "steps": args.steps,
            "train_frames": result.train_frames,
            "val_frames": result.val_frames,
            "final_loss": sum(result.history[-20:]) / len(result.history[-20:]),
        }
        print(f"{task}: {result.parameters / 1e6:.1f} M params, held-out {result.metrics}", flush=True)
        if args.export:
            write_model_folder(Path(args.export) / f"ppn-{task}-{size}", result, config)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
