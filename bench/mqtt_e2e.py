"""MQTT end-to-end latency of the bridge: frame published -> result received, minus expert compute.

Runs a real mosquitto, the real bridge (``moesaic ingest`` as a subprocess) and a zero-compute
Coordinator servicer on loopback in this process, publishes one frame at a time and times the
JSON result. The baseline is the broker alone: a publish received back by a subscriber. Target:
p50 <= 5 ms with mosquitto.

    .venv/bin/python bench/mqtt_e2e.py --frames 200 --out bench/results/mqtt_e2e.json
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiomqtt
import grpc
import numpy as np
from PIL import Image

from moesaic.ingest.broker import MosquittoProcess
from moesaic.proto import moesaic_pb2, moesaic_pb2_grpc

KITTI = Path("/work/shared/data/real/kitti_000008.bin")


class ZeroCompute(moesaic_pb2_grpc.CoordinatorServicer):
    """Answers at once with a small result, so only transport and bridge time is measured."""

    async def Perceive(self, request, context):  # type: ignore[no-untyped-def]
        response = moesaic_pb2.PerceiveResponse(
            request_id=request.request_id, task=request.task, budget_met=True
        )
        if request.WhichOneof("input") == "points":
            grid = np.zeros((64, 64), np.uint8)
            response.grid.CopyFrom(
                moesaic_pb2.Tensor(name="classes", datatype="UINT8", shape=[64, 64], data=grid.tobytes())
            )
        else:
            response.detections.items.add(xyxy=[0, 0, 10, 10], score=0.9, class_id=0, class_name="vehicle")
        return response


def payloads() -> dict[str, tuple[str, bytes]]:
    rng = np.random.default_rng(0)
    small = rng.uniform(-40, 40, (1000, 4)).astype("<f4").tobytes()
    kitti = (
        KITTI.read_bytes() if KITTI.exists() else rng.uniform(-40, 40, (120_000, 4)).astype("<f4").tobytes()
    )
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)).save(
        buffer, format="JPEG", quality=80
    )
    return {
        "lidar 1k points (16 KB)": ("lidar", small),
        f"lidar KITTI scan ({len(kitti) // 1024} KB)": ("lidar", kitti),
        f"camera JPEG 640x480 ({len(buffer.getvalue()) // 1024} KB)": ("camera", buffer.getvalue()),
    }


def quantiles(values: list[float]) -> tuple[float, float, float]:
    q = np.percentile(np.array(values), [50, 95, 99])
    return float(q[0]), float(q[1]), float(q[2])


async def time_broker_only(client: aiomqtt.Client, payload: bytes, frames: int) -> list[float]:
    await client.subscribe("bench/echo", qos=1)
    out = []
    for _ in range(frames):
        start = time.perf_counter()
        await client.publish("bench/echo", payload, qos=0)
        async for _message in client.messages:
            break
        out.append((time.perf_counter() - start) * 1e3)
    await client.unsubscribe("bench/echo")
    return out


async def time_bridge(client: aiomqtt.Client, kind: str, payload: bytes, frames: int) -> list[float]:
    sensor = f"bench-{kind}"
    task = "bev_segmentation" if kind == "lidar" else "detection"
    topic = f"moesaic/v1/results/{sensor}/{task}"
    await client.subscribe(topic, qos=1)
    out = []
    for _ in range(frames):
        start = time.perf_counter()
        await client.publish(f"moesaic/v1/sensors/{sensor}/{kind}", payload, qos=0)
        async with asyncio.timeout(10):
            async for message in client.messages:
                if str(message.topic) == topic:
                    break
        body = json.loads(message.payload)  # type: ignore[arg-type]
        out.append((time.perf_counter() - start) * 1e3 - float(body["latency_ms"]))  # minus expert compute
    await client.unsubscribe(topic)
    return out


async def run(frames: int, warmup: int) -> list[dict[str, object]]:
    server = grpc.aio.server()
    moesaic_pb2_grpc.add_CoordinatorServicer_to_server(ZeroCompute(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp, MosquittoProcess(Path(tmp)) as broker:
        config = Path(tmp) / "ingest.yaml"
        config.write_text(
            "defaults: {lidar: {tasks: [bev_segmentation], png: false}, camera: {tasks: [detection]}}\n"
        )
        bridge = subprocess.Popen(
            [
                *(sys.executable, "-m", "moesaic", "--log-level", "WARNING", "ingest"),
                *("--broker", broker.url, "--coordinator", f"127.0.0.1:{port}", "--config", str(config)),
            ],
            env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
        try:
            nodelay = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
            client = aiomqtt.Client(
                "127.0.0.1", broker.port, protocol=aiomqtt.ProtocolVersion.V5, socket_options=nodelay
            )
            async with client:
                await client.subscribe("moesaic/v1/status/ingest", qos=1)
                async with asyncio.timeout(30):
                    async for message in client.messages:
                        if message.payload == b"online":
                            break
                await client.unsubscribe("moesaic/v1/status/ingest")
                for name, (kind, payload) in payloads().items():
                    await time_bridge(client, kind, payload, warmup)
                    await time_broker_only(client, payload, warmup)
                    bridge_ms = await time_bridge(client, kind, payload, frames)
                    broker_ms = await time_broker_only(client, payload, frames)
                    b50, b95, b99 = quantiles(bridge_ms)
                    m50, _, _ = quantiles(broker_ms)
                    rows.append(
                        {
                            "payload": name,
                            "frames": frames,
                            "e2e_p50_ms": b50,
                            "e2e_p95_ms": b95,
                            "e2e_p99_ms": b99,
                            "e2e_mean_ms": statistics.fmean(bridge_ms),
                            "broker_only_p50_ms": m50,
                            "bridge_over_broker_p50": b50 / m50 if m50 else float("nan"),
                            "meets_5ms_p50": b50 <= 5.0,
                        }
                    )
        finally:
            bridge.terminate()
            bridge.wait(timeout=15)
            await server.stop(grace=None)
    return rows


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| payload | frames | e2e p50 ms | p95 ms | p99 ms | broker-only p50 ms | e2e / broker-only "
        "| p50 <= 5 ms |",
        "|---|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['payload']} | {r['frames']} | {r['e2e_p50_ms']:.2f} | {r['e2e_p95_ms']:.2f} "
            f"| {r['e2e_p99_ms']:.2f} | {r['broker_only_p50_ms']:.2f} | {r['bridge_over_broker_p50']:.1f}x "
            f"| {'yes' if r['meets_5ms_p50'] else 'no'} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=200, help="timed frames per payload")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="30 frames per payload")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    frames = 30 if args.quick else args.frames
    rows = asyncio.run(run(frames, 5 if args.quick else args.warmup))
    print(table(rows))
    cpu = platform.processor() or platform.machine()
    machine = f"{platform.node()}: {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"\nmachine: {machine}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"machine": machine, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
