"""How a camera frame reaches a node: decoded over gRPC, through shared memory, or encoded.

    python bench/frame_transport.py                  # CPU node, the KITTI frame, yolo-n

A real ``moesaic node`` serves ``models/yolo-n``; tritonclient[grpc] (unchanged, as a camera
process on the same host would use it) sends the 1242 x 375 KITTI frame ``kitti_000008.png``:

(a) ``wire``: the decoded RGB frame (1.4 MB) in the request;
(b) ``shm``: the decoded frame written into a registered system shared-memory region, the
    request naming the region (the frame never crosses the socket);
(c) ``png`` / ``jpeg``: the encoded frame as ``BYTES [1]``, decoded on the node;
(d) ``cuda_shm`` (where the host has a CUDA device and cuda-python): the frame written into GPU
    memory made by tritonclient's ``cuda_shared_memory`` utilities, registered by its CUDA IPC
    handle; the node copies it to the host once (the letterbox runs there).

Interleaved in chunks of 10; p50/p99 of the client round trip and the node's ``compute_ms``.
The shared-memory write of each frame is part of (b)'s time. tritonclient and moesaic's stubs
share the ``inference`` protobuf package, so this process imports no moesaic stubs. Raw JSON:
``bench/results/frame_transport.json``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import machine, write_results  # noqa: E402
from moesaic.fleet import ProcessTree, free_port, wait_grpc_ready  # noqa: E402

CHUNK = 10


def main() -> int:
    import cv2
    import tritonclient.grpc as triton
    import tritonclient.utils.shared_memory as shm

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/work/shared/data/real"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    for candidate in (args.data, ROOT / ".benchdata", ROOT.parent / "shared" / "data" / "real"):
        if (candidate / "kitti_000008.png").is_file():
            args.data = candidate
            break
    png = (args.data / "kitti_000008.png").read_bytes()
    frame = np.ascontiguousarray(cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)[..., ::-1])
    ok, jpeg_buf = cv2.imencode(
        ".jpg", np.ascontiguousarray(frame[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, 90]
    )
    assert ok
    jpeg = bytes(jpeg_buf)
    tmp = Path(tempfile.mkdtemp(prefix="frame-transport-"))
    port = free_port()
    key = f"/moesaic_bench_{uuid.uuid4().hex[:8]}"
    samples: dict[str, dict[str, list[float]]] = {}
    with ProcessTree(tmp) as tree:
        node = tree.spawn(
            "node",
            ["moesaic", "--log-level", "WARNING", "node", "--models", str(ROOT / "models"),
             "--device", args.device, "--listen", f"127.0.0.1:{port}"],
        )  # fmt: skip
        wait_grpc_ready(f"127.0.0.1:{port}", timeout=300, process=node)
        client = triton.InferenceServerClient(f"127.0.0.1:{port}")
        handle = shm.create_shared_memory_region("frame", key, frame.nbytes)
        client.register_system_shared_memory("frame", key, frame.nbytes)

        def wire() -> Any:
            tensor = triton.InferInput("image", list(frame.shape), "UINT8")
            tensor.set_data_from_numpy(frame)
            return client.infer("yolo-n", [tensor])

        def in_shm() -> Any:
            shm.set_shared_memory_region(handle, [frame])  # the camera process writes its frame
            tensor = triton.InferInput("image", list(frame.shape), "UINT8")
            tensor.set_shared_memory("frame", frame.nbytes)
            return client.infer("yolo-n", [tensor])

        def encoded(data: bytes) -> Any:
            def call() -> Any:
                tensor = triton.InferInput("image", [1], "BYTES")
                tensor.set_data_from_numpy(np.array([data], dtype=object))
                return client.infer("yolo-n", [tensor])

            return call

        calls = {"wire": wire, "shm": in_shm, "png": encoded(png), "jpeg": encoded(jpeg)}
        gpu = _cuda_region(client, frame)
        if gpu is not None:
            calls["cuda_shm"] = gpu[0]
        boxes = {k: call().as_numpy("boxes") for k, call in calls.items()}  # and warm-up
        assert np.array_equal(boxes["wire"], boxes["shm"]) and np.array_equal(boxes["wire"], boxes["png"])
        assert gpu is None or np.array_equal(boxes["wire"], boxes["cuda_shm"])
        for call in calls.values():
            for _ in range(10):
                call()
        samples = {k: {"rtt_ms": [], "compute_ms": []} for k in calls}
        while len(samples["wire"]["rtt_ms"]) < args.requests:
            for k, call in calls.items():
                for _ in range(CHUNK):
                    t0 = time.perf_counter()
                    result = call()
                    samples[k]["rtt_ms"].append((time.perf_counter() - t0) * 1e3)
                    samples[k]["compute_ms"].append(
                        result.get_response().parameters["compute_ms"].double_param
                    )
        client.unregister_system_shared_memory()
        shm.destroy_shared_memory_region(handle)
        if gpu is not None:
            client.unregister_cuda_shared_memory()
            gpu[1]()
    sizes = {"wire": frame.nbytes, "shm": 0, "png": len(png), "jpeg": len(jpeg), "cuda_shm": 0}
    lines = [
        f"yolo-n on {args.device}, KITTI frame {frame.shape[1]}x{frame.shape[0]}; p50 (p99) ms",
        "| frame as | bytes on the socket | round trip | node compute | round trip / wire |",
        "|---|---:|---:|---:|---:|",
    ]
    wire50 = float(np.percentile(samples["wire"]["rtt_ms"], 50))
    summary: dict[str, Any] = {"machine": machine(), "device": args.device, "rows": {}}
    for k, s in samples.items():
        r50, r99 = (float(np.percentile(s["rtt_ms"], q)) for q in (50, 99))
        c50 = float(np.percentile(s["compute_ms"], 50))
        summary["rows"][k] = {"bytes": sizes[k], "rtt_p50": r50, "rtt_p99": r99, "compute_p50": c50, **s}
        lines.append(f"| {k} | {sizes[k]:,} | {r50:.2f} ({r99:.2f}) | {c50:.2f} | {r50 / wire50:.2f}x |")
    print("\n".join(lines))
    summary["table"] = lines
    print(f"machine: {summary['machine']}")
    print(f"raw results: {write_results('frame_transport', summary, out=args.out)}")
    return 0


def _cuda_region(client: Any, frame: np.ndarray) -> tuple[Any, Any] | None:
    """(a call sending ``frame`` through a CUDA region, its clean-up), or None without CUDA."""
    from moesaic.runtime import cuda_ipc

    if not cuda_ipc.available():
        print(f"no cuda_shm row: {cuda_ipc.driver_problem()}")
        return None
    try:
        import tritonclient.utils.cuda_shared_memory as cudashm
    except (ImportError, RuntimeError) as exc:  # tritonclient raises RuntimeError without cuda-python
        print(f"no cuda_shm row: {exc}")
        return None
    import tritonclient.grpc as triton

    handle = cudashm.create_shared_memory_region("gpu-frame", frame.nbytes, 0)
    client.register_cuda_shared_memory("gpu-frame", cudashm.get_raw_handle(handle), 0, frame.nbytes)

    def call() -> Any:
        cudashm.set_shared_memory_region(handle, [frame])  # the camera's frame reaches the GPU
        tensor = triton.InferInput("image", list(frame.shape), "UINT8")
        tensor.set_shared_memory("gpu-frame", frame.nbytes)
        return client.infer("yolo-n", [tensor])

    return call, lambda: cudashm.destroy_shared_memory_region(handle)


if __name__ == "__main__":
    sys.exit(main())
