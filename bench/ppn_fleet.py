"""PPN through the product path: one LiDAR frame, segmentation and reconstruction, two nodes.

    python bench/ppn_fleet.py --seg runs/ppn-large/torch/ppn-seg-large \\
        --rec runs/ppn-large/torch/ppn-rec-large --seg-device cuda:0 --rec-device cuda:1
    python bench/ppn_fleet.py                       # CPU: the shipped small experts, both on cpu

Every figure goes through what users run: ``moesaic node`` processes, a ``moesaic coordinator``
process, and this process as the client, which sends each frame as two Perceive requests at
once (``bev_segmentation`` and ``bev_reconstruction``, the same ``sensor_id``): the way the
MQTT bridge fans a LiDAR frame out to a sensor's tasks (docs/ppn-fleet.md). Each node encodes
the scan into its BEV grid itself (on its GPU when it has one), so only the scan crosses the
wire. Two fleets, started one after the other:

- ``split``: node A serves segmentation on ``--seg-device``, node B reconstruction on
  ``--rec-device`` (two GPUs, one GPU twice, or GPU + CPU);
- ``one node``: one node serves both models on ``--seg-device``: the sequential baseline.

In each fleet, ``--frames`` frames are timed with segmentation alone, reconstruction alone
and both at once; in the one-node fleet also one after the other: the sequential frame. A
frame's time is the client's wall time until both replies are in: the nodes' replies come
after their outputs were copied to the host, so the GPUs' work is finished
(device-synchronized). Energy per frame is the sum of the replies' attributed energy, from the
nodes' cost meters. The overlap bound is what perfect parallelism gives: a frame as fast as the
split fleet's slower expert alone. The BEV encoding is timed both ways (:func:`encoding_costs`).

Frames: the real KITTI and nuScenes scans (fixtures from ../shared/data/real, never shipped),
alternated in one stream. Raw JSON: ``bench/results/ppn_fleet_<label>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import write_results  # noqa: E402
from moesaic.fleet import ProcessTree, free_port, wait_grpc_ready  # noqa: E402
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc  # noqa: E402

TASKS = ("bev_segmentation", "bev_reconstruction")


def default_data() -> Path:
    for candidate in (ROOT / "out" / "benchdata", ROOT.parent / "shared" / "data" / "real"):
        if (candidate / "kitti_000008.bin").is_file():
            return candidate
    return Path("/work/shared/data/real")


def load_scans(data: Path) -> list[moesaic_pb2.PointCloud]:
    """The KITTI scan (x, y, z, intensity) and the nuScenes scan (5 fields, the coordinator
    keeps the first four)."""
    scans = [moesaic_pb2.PointCloud(data=(data / "kitti_000008.bin").read_bytes(), fields=4)]
    nuscenes = data / "nuscenes_lidar_top.pcd.bin"
    if nuscenes.is_file():
        scans.append(moesaic_pb2.PointCloud(data=nuscenes.read_bytes(), fields=5))
    return scans


@dataclass(frozen=True)
class Layout:
    name: str
    nodes: tuple[tuple[str, tuple[Path, ...]], ...]
    """(device, model folders) per node."""


def start_fleet(tree: ProcessTree, work: Path, layout: Layout, log_level: str) -> str:
    """The layout's nodes and a coordinator; returns the coordinator's address."""
    nodes = []
    for i, (device, models) in enumerate(layout.nodes):
        repo = work / f"{layout.name}-node{i}"
        repo.mkdir()
        for model in models:
            (repo / model.name).symlink_to(model.resolve())
        port = free_port()
        proc = tree.spawn(
            f"{layout.name}-node{i}",
            ["moesaic", "--log-level", log_level, "node", "--models", str(repo), "--device", device,
             "--listen", f"127.0.0.1:{port}", "--node-id", f"{layout.name}-{i}"],
        )  # fmt: skip
        nodes.append((f"127.0.0.1:{port}", device, proc))
    for (address, _, proc), (_, models) in zip(nodes, layout.nodes, strict=True):
        wait_grpc_ready(address, timeout=600, process=proc)  # every model has finished loading
        for model in models:  # and each of them serves (a model that failed to load does not)
            wait_grpc_ready(address, service=model.name, timeout=5, process=proc)
    fleet = work / f"{layout.name}-fleet.yaml"
    fleet.write_text(
        "coordinator: {overhead_ms: 5, probe_interval_s: 2, expert_timeout_ms: 120000,"
        " default_deadline_ms: 120000}\n"
        "nodes:\n"
        + "".join(
            f"  - {{address: '{a}', name: {layout.name}-{i}, device: '{d}'}}\n"
            for i, (a, d, _) in enumerate(nodes)
        )
        + "tasks:\n"
        + "".join(f"  {t}: {{input_kind: points}}\n" for t in TASKS)
    )  # fmt: skip
    port = free_port()
    proc = tree.spawn(
        f"{layout.name}-coordinator",
        [
            "moesaic",
            "--log-level",
            log_level,
            "coordinator",
            "--config",
            str(fleet),
            "--listen",
            f"127.0.0.1:{port}",
        ],
    )
    wait_grpc_ready(f"127.0.0.1:{port}", service="moesaic.v1.Coordinator", timeout=120, process=proc)
    return f"127.0.0.1:{port}"


async def perceive(
    stub: Any, task: str, scan: moesaic_pb2.PointCloud, frame: int
) -> moesaic_pb2.PerceiveResponse:
    request = moesaic_pb2.PerceiveRequest(
        task=task,
        points=scan,
        sensor_id="lidar-top",
        frame_id=frame,
        budget=moesaic_pb2.Budget(latency_ms=120_000),
    )
    reply: moesaic_pb2.PerceiveResponse = await stub.Perceive(request, timeout=180)
    failed = [e for e in reply.experts if e.status != "ok"]
    if failed or not reply.experts:
        raise RuntimeError(f"{task}: frame {frame}: {[(e.expert_id, e.status, e.error) for e in failed]}")
    return reply


async def run_frames(
    address: str,
    scans: list[Any],
    tasks: tuple[str, ...],
    frames: int,
    warmup: int,
    *,
    one_by_one: bool = False,
) -> dict[str, Any]:
    """``frames`` frames, each sent to ``tasks`` at once (or ``one_by_one``); per frame: wall time
    until every reply is in, each task's expert call time, attributed energy."""
    async with grpc.aio.insecure_channel(
        address, options=[("grpc.max_receive_message_length", 256 << 20)]
    ) as channel:
        stub = moesaic_pb2_grpc.CoordinatorStub(channel)
        wall: list[float] = []
        energy: list[float] = []
        sources: set[str] = set()
        expert_ms: dict[str, list[float]] = {t: [] for t in tasks}
        for frame in range(warmup + frames):
            scan = scans[frame % len(scans)]
            start = time.perf_counter()
            if one_by_one:
                replies = [await perceive(stub, t, scan, frame) for t in tasks]
            else:
                replies = await asyncio.gather(*(perceive(stub, t, scan, frame) for t in tasks))
            elapsed = (time.perf_counter() - start) * 1e3
            if frame < warmup:
                continue
            wall.append(elapsed)
            energy.append(sum(r.measured_energy_mj for r in replies))
            for task, reply in zip(tasks, replies, strict=True):
                expert_ms[task].append(max(e.latency_ms for e in reply.experts))
                sources.update(e.expert_id for e in reply.experts)
    return {
        "tasks": list(tasks),
        "frames": frames,
        "p50_ms": statistics.median(wall),
        "p99_ms": float(np.percentile(wall, 99)),
        "mean_ms": statistics.fmean(wall),
        "expert_p50_ms": {t: statistics.median(v) for t, v in expert_ms.items()},
        "energy_mj_per_frame": statistics.fmean(energy),
        "experts": sorted(sources),
    }


def measure(address: str, scans: list[Any], frames: int, warmup: int, *, sequential: bool) -> dict[str, Any]:
    modes = [("seg", TASKS[:1], False), ("rec", TASKS[1:], False), ("both", TASKS, False)]
    if sequential:
        modes.append(("seq", TASKS, True))
    out = {}
    for key, tasks, one_by_one in modes:
        out[key] = asyncio.run(run_frames(address, scans, tasks, frames, warmup, one_by_one=one_by_one))
        print(f"  {key:5s} p50 {out[key]['p50_ms']:9.2f} ms  p99 {out[key]['p99_ms']:9.2f} ms  "
              f"{out[key]['energy_mj_per_frame']:9.1f} mJ/frame", flush=True)  # fmt: skip
    return out


def encoding_costs(model: Path, device: str, scans: list[Any]) -> dict[str, dict[str, float]]:
    """The BEV encoding measured both ways: on the node (its processor, placed on ``device``:
    what the product does) and once on the coordinator (the same processor on the CPU), which
    would then send the stacked grid to each node instead of the scan: one gRPC call carrying
    the grid's bytes to a server on loopback is timed for that."""
    from moesaic.runtime.processing import create_processor

    spec = yaml.safe_load((model / "model.yaml").read_text())
    points = [np.frombuffer(s.data, np.float32).reshape(-1, s.fields or 4)[:, :4].copy() for s in scans]
    node = _encode(create_processor(spec["processor"], model), device, points)
    coordinator = (
        node if device == "cpu" else _encode(create_processor(spec["processor"], model), "cpu", points)
    )
    scan_bytes = float(np.mean([len(s.data) for s in scans]))
    return {
        f"node ({device})": {**node, "sent_bytes_per_node": scan_bytes},
        "coordinator (cpu)": {
            **coordinator,
            "sent_bytes_per_node": coordinator["grid_bytes"],
            "send_ms_per_node": loopback_send_ms(int(coordinator["grid_bytes"])),
        },
    }


def _encode(processor: Any, where: str, points: list[np.ndarray]) -> dict[str, float]:
    processor.place(where)
    times = []
    for i in range(40):
        start = time.perf_counter()
        (tensor,) = processor.preprocess({"points": points[i % len(points)]}, {"sensor_id": "x"})[0].values()
        if where.startswith("cuda"):
            import torch

            torch.cuda.synchronize(where)
        if i >= 10:
            times.append((time.perf_counter() - start) * 1e3)
    return {"p50_ms": statistics.median(times), "grid_bytes": float(tensor.nbytes)}  # numpy's and torch's


def loopback_send_ms(nbytes: int, repeats: int = 10) -> float:
    """p50 of one gRPC call carrying ``nbytes`` to a server on loopback that answers nothing."""
    limit = nbytes + (1 << 20)
    options = [("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)]
    server = grpc.server(ThreadPoolExecutor(max_workers=2), options=options)
    sink = grpc.unary_unary_rpc_method_handler(lambda request, context: b"")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("bench.Sink", {"Put": sink}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    payload = bytes(nbytes)
    times = []
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            put = channel.unary_unary("/bench.Sink/Put")
            for i in range(repeats + 2):
                start = time.perf_counter()
                put(payload, timeout=120)
                if i >= 2:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        server.stop(0)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--seg", type=Path, default=ROOT / "models" / "ppn-seg-small", help="segmentation model folder"
    )
    parser.add_argument(
        "--rec", type=Path, default=ROOT / "models" / "ppn-rec-small", help="reconstruction model folder"
    )
    parser.add_argument("--seg-device", default="cpu", help="node A's device (and the one-node fleet's)")
    parser.add_argument("--rec-device", default="cpu", help="node B's device")
    parser.add_argument("--frames", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--data", type=Path, default=default_data(), help="folder with the real scans")
    parser.add_argument("--label", default=None, help="results name suffix (default: the two devices)")
    parser.add_argument("--log-level", default="WARNING")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for folder in (args.seg, args.rec):
        if not (folder / "model.yaml").is_file():
            parser.error(f"{folder}: not a model folder (no model.yaml)")
    scans = load_scans(args.data)
    layouts = (
        Layout("split", ((args.seg_device, (args.seg,)), (args.rec_device, (args.rec,)))),
        Layout("onenode", ((args.seg_device, (args.seg, args.rec)),)),
    )
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="ppn-fleet-") as tmp:
        work = Path(tmp)
        for layout in layouts:
            print(f"{layout.name}: {[(d, [m.name for m in ms]) for d, ms in layout.nodes]}", flush=True)
            with ProcessTree(work) as tree:
                try:
                    address = start_fleet(tree, work, layout, args.log_level)
                    sequential = layout.name == "onenode"
                    results[layout.name] = measure(
                        address, scans, args.frames, args.warmup, sequential=sequential
                    )
                except Exception:
                    for child in tree.children:
                        print(f"--- {child.name}\n{tree.tail(child, 30)}", file=sys.stderr)
                    raise
    one, split = results["onenode"], results["split"]
    sequential_ms = one["seq"]["p50_ms"]
    bound_ms = max(split["seg"]["p50_ms"], split["rec"]["p50_ms"])
    speedup = sequential_ms / split["both"]["p50_ms"]
    encoding = encoding_costs(args.seg, args.seg_device, scans)
    summary = {
        "seg_model": str(args.seg),
        "rec_model": str(args.rec),
        "seg_device": args.seg_device,
        "rec_device": args.rec_device,
        "scans": len(scans),
        "fleets": results,
        "sequential_ms": sequential_ms,
        "overlap_bound_ms": bound_ms,
        "speedup_vs_sequential": speedup,
        "bound_speedup": sequential_ms / bound_ms,
        "share_of_bound": bound_ms / split["both"]["p50_ms"],
        "encoding": encoding,
    }
    print()
    print("| fleet | frame | p50 ms | p99 ms | mJ / frame | vs sequential |")
    print("|---|---|---:|---:|---:|---:|")
    rows = [("one node", "seg alone", one["seg"]), ("one node", "rec alone", one["rec"]),
            ("one node", "seg then rec (sequential)", one["seq"]), ("one node", "both at once", one["both"]),
            ("split", "seg alone", split["seg"]), ("split", "rec alone", split["rec"]),
            ("split", "both at once", split["both"])]  # fmt: skip
    for fleet, frame, r in rows:
        mj, ratio = r["energy_mj_per_frame"], sequential_ms / r["p50_ms"]
        print(f"| {fleet} | {frame} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {mj:.1f} | {ratio:.3f}x |")
    share = 100 * bound_ms / split["both"]["p50_ms"]
    print(
        f"\nsplit, both at once: {speedup:.3f}x the sequential frame; overlap bound (the slower expert "
        f"alone) {bound_ms:.2f} ms = {sequential_ms / bound_ms:.3f}x; {share:.1f} % of the bound"
    )
    for where, figures in encoding.items():
        print(f"BEV encoding on {where}: {figures}")
    label = args.label or f"{args.seg_device}_{args.rec_device}".replace(":", "")
    path = write_results(f"ppn_fleet_{label}", summary, out=args.out)
    print(f"raw: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
