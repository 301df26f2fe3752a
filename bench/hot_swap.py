"""A model version swapped in, and a corrupt one refused, under a steady request stream.

    python bench/hot_swap.py                       # yolo-n (320 px) -> the 640 px weights as version 2
    python bench/hot_swap.py --clients 3 --phase-s 8

A ``moesaic node`` process serves a copy of ``models/yolo-n`` (version 1). ``--clients``
threads send the bundled 640x640 camera frame back to back. After ``--phase-s`` seconds,
``moesaic import-model`` adds ``models/yolo-n-640``'s weights as version 2 and a
``RepositoryModelLoad`` swaps it in (load + warm-up beside version 1, one switch, version 1
retired once its requests finished); after another phase a corrupt version 3 is added and
loaded, which must fail and leave version 2 serving. Prints the requests and failures of each
phase, latency quantiles, and how long each load call took; writes bench/results/hot_swap.json.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.record import machine, write_results  # noqa: E402
from moesaic.nodes.codec import decode_response, encode_request  # noqa: E402
from moesaic.nodes.importing import import_model  # noqa: E402
from moesaic.proto import inference_pb2, inference_pb2_grpc  # noqa: E402
from tests.helpers.nodes import node_process  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
FRAME = ROOT / "moesaic" / "assets" / "sample_camera" / "intersection_00.jpg"


def _load(address: str, name: str) -> tuple[float, str]:
    """Seconds the RepositoryModelLoad took and its status code name."""
    with grpc.insecure_channel(address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        t0 = time.perf_counter()
        try:
            stub.RepositoryModelLoad(inference_pb2.RepositoryModelLoadRequest(model_name=name), timeout=300)
            code = "OK"
        except grpc.RpcError as exc:
            code = exc.code().name
        return time.perf_counter() - t0, code


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds of each phase")
    args = parser.parse_args()
    from PIL import Image

    image = np.asarray(Image.open(FRAME).convert("RGB"))
    request = encode_request("yolo-n", {"image": image})
    replies: list[tuple[float, str, float]] = []  # (sent at, version or error code, seconds)
    lock = threading.Lock()
    stop = threading.Event()

    with tempfile.TemporaryDirectory(prefix="moesaic-hot-swap-") as scratch:
        repo = Path(scratch) / "models"
        repo.mkdir()
        shutil.copytree(ROOT / "models" / "yolo-n", repo / "yolo-n")
        with node_process(repo) as (_, address):

            def client() -> None:
                with grpc.insecure_channel(address) as channel:
                    call = channel.unary_unary(INFER)
                    while not stop.is_set():
                        t0 = time.perf_counter()
                        try:
                            header, _ = decode_response(call(request, timeout=60))
                            outcome = header.model_version
                        except grpc.RpcError as exc:
                            outcome = exc.code().name
                        with lock:
                            replies.append((t0, outcome, time.perf_counter() - t0))

            threads = [threading.Thread(target=client, daemon=True) for _ in range(args.clients)]
            start = time.perf_counter()
            for thread in threads:
                thread.start()
            time.sleep(args.phase_s)
            import_model(ROOT / "models" / "yolo-n-640" / "model.onnx", repo, name="yolo-n", profile_runs=0)
            swap_at = time.perf_counter()
            swap_s, swap_code = _load(address, "yolo-n")
            time.sleep(args.phase_s)
            broken = repo / "yolo-n" / "3"
            broken.mkdir()
            (broken / "model.onnx").write_bytes(b"\x08\x07 not an ONNX model")
            bad_at = time.perf_counter()
            bad_s, bad_code = _load(address, "yolo-n")
            time.sleep(args.phase_s)
            stop.set()
            for thread in threads:
                thread.join(60)

    phases = {
        "version 1 alone": (start, swap_at),
        "swap to version 2 (load call)": (swap_at, swap_at + swap_s),
        "version 2 after the swap": (swap_at + swap_s, bad_at),
        "corrupt version 3 refused": (bad_at, float("inf")),
    }
    rows: list[dict[str, Any]] = []
    for label, (t_from, t_to) in phases.items():
        inside = [r for r in replies if t_from <= r[0] < t_to]
        ok = [r for r in inside if r[1].isdigit()]
        ms = sorted(r[2] * 1e3 for r in ok)
        rows.append(
            {
                "phase": label,
                "requests": len(inside),
                "failed": len(inside) - len(ok),
                "versions": sorted({r[1] for r in ok}),
                "p50_ms": round(float(np.percentile(ms, 50)), 1) if ms else None,
                "p99_ms": round(float(np.percentile(ms, 99)), 1) if ms else None,
                "max_ms": round(ms[-1], 1) if ms else None,
            }
        )
    summary = {
        "machine": machine(),
        "clients": args.clients,
        "phase_s": args.phase_s,
        "swap_load_s": round(swap_s, 3),
        "swap_status": swap_code,
        "corrupt_load_s": round(bad_s, 3),
        "corrupt_status": bad_code,
        "requests": len(replies),
        "failed": sum(not r[1].isdigit() for r in replies),
        "phases": rows,
    }
    heads = ("requests", "failed", "versions", "p50 ms", "p99 ms", "max ms")
    print(f"{'phase':<32} " + " ".join(f"{h:>8}" for h in heads))
    for row in rows:
        print(
            f"{row['phase']:<32} {row['requests']:>8} {row['failed']:>8} {','.join(row['versions']):>8} "
            f"{row['p50_ms']!s:>8} {row['p99_ms']!s:>8} {row['max_ms']!s:>8}"
        )
    print(
        f"swap load call {swap_s:.2f} s ({swap_code}); corrupt load call {bad_s:.2f} s ({bad_code}); "
        f"{summary['failed']} of {summary['requests']} requests failed"
    )
    write_results("hot_swap", summary)
    return 0 if summary["failed"] == 0 and swap_code == "OK" and bad_code == "FAILED_PRECONDITION" else 1


if __name__ == "__main__":
    sys.exit(main())
