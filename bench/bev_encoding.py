"""BEV encoding on one CPU core: the reference 3D-voxel method vs moesaic's encoders.

The same ~120k-point scan (ray-cast from the synthetic race track with a 128-beam sensor, or,
without open3d, the real KITTI scan tiled) goes through every method; the PPN occupancy output
must be identical to the reference's. Also times reading the scan and the real KITTI and
nuScenes scans. Prints a table with ratios and writes JSON.

    taskset -c 0 .venv/bin/python bench/bev_encoding.py --out bench/results/bev_encoding.json
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesaic.datasets.bev import (  # noqa: E402
    BevGrid,
    multi_channel,
    ppn_occupancy,
    reference_voxel_occupancy,
)
from moesaic.datasets.pointcloud import read_points, write_kitti_bin  # noqa: E402

REAL = Path("/work/shared/data/real")
CPU_GRID = BevGrid(0.4, (-51.2, 51.2), (-51.2, 51.2), (-5.0, 5.0))


def scan_120k() -> tuple[np.ndarray, str]:
    """A 120,000-point scan and where it came from."""
    try:
        from moesaic.datasets.lidar_scenes import SensorModel, generate_sequence

        with tempfile.TemporaryDirectory() as tmp:
            generate_sequence(tmp, frames=1, seed=5, sensor=SensorModel(beams=128, azimuth_steps=1200))
            points = read_points(Path(tmp) / "velodyne" / "000000.bin")
        source = "synthetic race track, 128 x 1200 beams"
    except ImportError:
        points = read_points(REAL / "kitti_000008.bin")
        source = "KITTI 000008 tiled"
    reps = -(-120_000 // len(points))
    points = np.tile(points, (reps, 1))[:120_000]
    return np.ascontiguousarray(points), source


def timeit(fn: Callable[[], object], repeat: int, warmup: int = 3) -> dict[str, float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    arr = np.array(times) * 1e3
    return {
        "median_ms": float(np.median(arr)),
        "min_ms": float(arr.min()),
        "p90_ms": float(np.quantile(arr, 0.9)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--repeat", type=int, default=200)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke test)")
    args = parser.parse_args()
    repeat = 10 if args.quick else args.repeat
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    points, source = scan_120k()
    lifted = points.copy()
    lifted[:, 2] += np.float32(1.0)  # worst case for the z > 0 filter: most points survive it
    identical = bool(np.array_equal(ppn_occupancy(points), reference_voxel_occupancy(points)))
    identical &= bool(np.array_equal(ppn_occupancy(lifted), reference_voxel_occupancy(lifted)))
    reals = {}
    for name in ("kitti_000008.bin", "nuscenes_lidar_top.pcd.bin"):
        if (REAL / name).is_file():
            pts = read_points(REAL / name)
            reals[name] = {
                "points": len(pts),
                "identical": bool(np.array_equal(ppn_occupancy(pts), reference_voxel_occupancy(pts))),
                "ppn_occupancy": timeit(lambda p=pts: ppn_occupancy(p), repeat),
            }
    buf1000 = np.zeros((4, 1000, 1000), np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scan.bin"
        write_kitti_bin(path, points)
        rows = {
            "reference 3D voxel grid (1000x1000x50)": timeit(
                lambda: reference_voxel_occupancy(points), max(5, repeat // 20)
            ),
            "ppn_occupancy (1000x1000)": timeit(lambda: ppn_occupancy(points), repeat),
            f"ppn_occupancy, scan lifted 1 m (z > 0: {float((lifted[:, 2] > 0).mean()):.0%})": timeit(
                lambda: ppn_occupancy(lifted), repeat
            ),
            "read_points (.bin)": timeit(lambda: read_points(path), repeat),
            "read + ppn_occupancy": timeit(lambda: ppn_occupancy(read_points(path)), repeat),
            "multi_channel 4ch 256x256 (0.4 m)": timeit(lambda: multi_channel(points, CPU_GRID), repeat),
            "multi_channel 4ch 1000x1000 (0.2 m), out=": timeit(
                lambda: multi_channel(points, out=buf1000), repeat
            ),
            "multi_channel 4ch 1000x1000 (0.2 m), new": timeit(lambda: multi_channel(points), repeat),
        }
    ref = rows["reference 3D voxel grid (1000x1000x50)"]["median_ms"]
    print(
        f"scan: {len(points):,} points ({source}); one CPU core; "
        f"PPN output identical to reference: {identical}"
    )
    print(f"{'method':45s} {'median ms':>10s} {'min ms':>8s} {'x faster than reference':>24s}")
    for name, r in rows.items():
        print(f"{name:45s} {r['median_ms']:10.3f} {r['min_ms']:8.3f} {ref / r['median_ms']:24.1f}")
    for name, r in reals.items():
        t = r["ppn_occupancy"]
        print(
            f"real {name} ({r['points']:,} points): ppn_occupancy {t['median_ms']:.3f} ms, "
            f"identical: {r['identical']}"
        )
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "numpy": np.__version__,
        "points": len(points),
        "z_above_0": float((points[:, 2] > 0).mean()),
        "source": source,
        "identical": identical,
        "rows": rows,
        "speedup_vs_reference": {k: ref / v["median_ms"] for k, v in rows.items()},
        "real_scans": reals,
    }
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if identical and all(r["identical"] for r in reals.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
