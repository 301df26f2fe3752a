"""LiDAR commands: ``moesaic bev``, ``moesaic generate-lidar`` and ``moesaic train ppn``.

    moesaic bev SCAN.bin --out bev.png [--mode ppn|multi]
    moesaic generate-lidar --out DIR --frames 40 --sequences 6
    moesaic train ppn --data DIR --task seg --size small --out models/ppn-seg-small

Heavy imports (torch, open3d, matplotlib) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import numpy as np

__all__ = ["register", "register_train"]


def _render(scan: Path, out: Path, mode: str, resolution: float, extent: float) -> None:
    from PIL import Image

    from moesaic.datasets.bev import BevGrid, bev_image, multi_channel, ppn_occupancy
    from moesaic.datasets.pointcloud import read_points

    points = read_points(scan)
    if mode == "ppn":
        occ = ppn_occupancy(points)
        image = np.where(occ, 255, 0).astype(np.uint8)
        rgb = np.stack([image] * 3, -1)
    else:
        grid = BevGrid(resolution, (-extent, extent), (-extent, extent), (-5.0, 5.0))
        bev = multi_channel(points, grid)
        occupied = bev[3] > 0
        span = 10.0
        height = np.clip(bev[0] / span, 0, 1)
        intensity = bev[2] / max(float(bev[2].max()), 1e-6)
        density = bev[3] / max(float(bev[3].max()), 1e-6)
        rgb = (np.stack([height, intensity, density], -1) * 255).astype(np.uint8)
        rgb[~occupied] = 0
    Image.fromarray(bev_image(rgb)).save(out)  # forward up, left on the left, as the bridge's /png


def _bev(args: argparse.Namespace) -> int:
    try:
        _render(Path(args.scan), Path(args.out), args.mode, args.resolution, args.extent)
    except (ValueError, FileNotFoundError) as exc:
        print(f"moesaic bev: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


def _generate(args: argparse.Namespace) -> int:
    from moesaic.datasets.lidar_scenes import SceneConfig, SensorModel, generate_sequence

    out = Path(args.out)
    sensors = [
        SensorModel(beams=int(b), azimuth_steps=int(a))
        for b, a in (s.split("x") for s in args.sensors.split(","))
    ]
    for k in range(args.sequences):
        folder = out if args.sequences == 1 else out / f"seq{k:02d}"
        sensor = sensors[k % len(sensors)]
        sensor = SensorModel(**{**sensor.__dict__, "dropout": args.dropout, "range_noise": args.range_noise})
        scene = SceneConfig(cones=args.cones, cars=args.cars)
        generate_sequence(
            folder, frames=args.frames, seed=args.seed + k, scene=scene, sensor=sensor, start_time=7.0 * k
        )
        print(
            f"{folder}: {args.frames} frames, {sensor.beams} x {sensor.azimuth_steps} beams, "
            f"seed {args.seed + k}"
        )
    return 0


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``bev`` and ``generate-lidar``."""
    p = subparsers.add_parser("bev", help="render a LiDAR scan as a bird's-eye-view image")
    p.add_argument("scan", help="scan file: .bin (KITTI), .pcd.bin (nuScenes), .pcd, .ply, .npy")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--mode", choices=("ppn", "multi"), default="multi", help="ppn occupancy or four channels")
    p.add_argument("--resolution", type=float, default=0.2, help="multi mode: cell size in metres")
    p.add_argument("--extent", type=float, default=50.0, help="multi mode: half width of the grid in metres")
    p.set_defaults(func=_bev)

    g = subparsers.add_parser(
        "generate-lidar", help="ray-cast labelled synthetic LiDAR sequences (KITTI layout)"
    )
    g.add_argument(
        "--out", required=True, help="output folder (one sub-folder per sequence when --sequences > 1)"
    )
    g.add_argument("--frames", type=int, default=40, help="frames per sequence (10 Hz)")
    g.add_argument("--sequences", type=int, default=1, help="sequences, each a different random track")
    g.add_argument("--seed", type=int, default=0, help="seed of the first sequence")
    g.add_argument("--sensors", default="64x1024", help="beams x azimuth steps, comma-separated, cycled")
    g.add_argument("--dropout", type=float, default=0.05, help="fraction of returns dropped")
    g.add_argument("--range-noise", type=float, default=0.02, help="range noise sigma (m)")
    g.add_argument("--cones", type=int, default=60)
    g.add_argument("--cars", type=int, default=5)
    g.set_defaults(func=_generate)


def _train(args: argparse.Namespace) -> int:
    from moesaic.models.ppn.encoding import PpnEncoding
    from moesaic.models.ppn.training import TrainConfig, train, write_model_folder

    options: dict[str, object] = {"mode": args.mode, "frames": args.frames}
    if args.mode == "multi":
        half = args.cells * args.resolution / 2
        options |= {"resolution": args.resolution, "x_range": (-half, half), "y_range": (-half, half)}
    try:
        encoding = PpnEncoding.from_options(options)
    except ValueError as exc:
        print(f"moesaic train ppn: {exc}", file=sys.stderr)
        return 2
    config = TrainConfig(
        data=Path(args.data),
        task=args.task,
        size=args.size,
        encoding=encoding,
        steps=args.steps,
        batch=args.batch,
        crop=args.crop,
        lr=args.lr,
        edge_weight=args.edge_weight,
        val_sequences=args.val_sequences,
        seed=args.seed,
        device=args.device,
        threads=args.threads,
    )

    from moesaic.runtime.progress import TrainingProgress

    with TrainingProgress(f"train ppn {args.task}", total=args.steps) as bar:

        def progress(step: int, total: int, loss: float) -> None:
            bar.total = total
            bar.advance(step - bar.done, note=f"step {step}/{total} loss {loss:.4f}")

        result = train(config, progress)
    out = Path(args.out or f"models/ppn-{args.task}-{args.size}")
    write_model_folder(out, result, config, command="moesaic " + shlex.join(sys.argv[1:]))
    shown = {k: round(v, 4) for k, v in result.metrics.items()}
    print(f"held-out ({result.val_frames} frames): {shown}; {result.seconds:.0f} s; wrote {out}")
    return 0


def register_train(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``train ppn``."""
    p = subparsers.add_parser("ppn", help="train a PPN BEV segmentation or reconstruction expert")
    p.add_argument("--data", required=True, help="folder of sequences (moesaic generate-lidar --sequences N)")
    p.add_argument("--task", choices=("seg", "rec"), default="seg")
    p.add_argument("--size", choices=("small", "large"), default="small")
    p.add_argument("--out", default=None, help="model folder (default models/ppn-TASK-SIZE)")
    p.add_argument("--mode", choices=("multi", "ppn"), default="multi", help="BEV encoding")
    p.add_argument("--frames", type=int, default=4, help="stacked frames T")
    p.add_argument("--resolution", type=float, default=0.4, help="multi mode cell size (m)")
    p.add_argument("--cells", type=int, default=256, help="multi mode grid side in cells")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=128, help="random training crop side (0 = whole grid)")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--edge-weight", type=float, default=0.5)
    p.add_argument("--val-sequences", type=int, default=1, help="last N sequences held out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=_train)
