"""Dynamic batching on a node: throughput of 16 concurrent clients with and without it.

    python bench/node_batching.py                       # 16 clients, 3 rounds of 5 s per mode
    python bench/node_batching.py --quick               # 1 round of 2 s (smoke test)

One node process (``python -m moesaic node``, 32 request threads) serves the same MatMul-heavy
ONNX model twice: ``mlp`` (no batching: every request is its own ONNX Runtime call, run
concurrently from the request threads) and ``mlp_batched`` (``dynamic_batching``: requests
arriving within ``--delay-us`` are concatenated into one call of up to ``--max-batch`` rows).
The model is ``--layers`` x (MatMul ``[d, d]`` + Relu) on ``x [N, d]``: at batch 1 each layer
reads the whole weight matrix for one row (memory bound), so batching rows amortises it.

``--clients`` threads in this process each send one request (``x [1, d]`` FP32) at a time in a
closed loop over their own gRPC channel for ``--seconds``; the two modes alternate in
``--rounds`` rounds so machine noise hits both. Prints requests/s, latency p50/p99, the mean
requests per engine call (from the node's /metrics) and the ratios; ``--out`` writes JSON,
``--markdown`` the table with command and machine.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moesaic.fleet import free_port  # noqa: E402
from moesaic.nodes.codec import decode_response, encode_request  # noqa: E402
from moesaic.proto import inference_pb2  # noqa: E402
from tests.helpers.onnx_models import write_matmul_model  # noqa: E402

INFER = "/inference.GRPCInferenceService/ModelInfer"
MODES = {"mlp": "without batching", "mlp_batched": "dynamic batching"}


@contextlib.contextmanager
def node_process(models: Path, port: int, metrics_port: int, workers: int) -> Iterator[str]:
    address = f"127.0.0.1:{port}"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(ROOT),
        "MOESAIC_NODE_MAX_WORKERS": str(workers),
    }
    command = [sys.executable, "-m", "moesaic", "--log-level", "WARNING", "node", "--models", str(models),
               "--listen", address, "--metrics-port", str(metrics_port)]  # fmt: skip
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        with grpc.insecure_channel(address) as channel:
            ready = channel.unary_unary(
                "/inference.GRPCInferenceService/ServerReady",
                request_serializer=inference_pb2.ServerReadyRequest.SerializeToString,
                response_deserializer=inference_pb2.ServerReadyResponse.FromString,
            )
            while True:
                if proc.poll() is not None:
                    stderr = proc.stderr.read().decode() if proc.stderr else ""
                    raise RuntimeError(f"node exited with {proc.returncode}: {stderr}")
                with contextlib.suppress(grpc.RpcError):
                    if ready(inference_pb2.ServerReadyRequest(), timeout=1).ready:
                        break
                if time.monotonic() > deadline:
                    raise TimeoutError("node not ready after 120 s")
                time.sleep(0.2)
        yield address
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def batch_counts(metrics_port: int, model: str) -> tuple[float, float]:
    """(engine calls, requests in them) of ``model`` from the node's /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as reply:
        text = reply.read().decode()
    values = {
        s.name: s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("expert") == model and s.name.startswith("moesaic_batch_requests_")
    }
    return values.get("moesaic_batch_requests_count", 0.0), values.get("moesaic_batch_requests_sum", 0.0)


def drive(address: str, model: str, clients: int, seconds: float, width: int) -> tuple[int, list[float]]:
    """``clients`` closed-loop threads for ``seconds``: (completed requests, latencies in s)."""
    stop = threading.Event()
    start = threading.Barrier(clients + 1)
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors: list[BaseException] = []

    def client(i: int) -> None:
        x = np.random.default_rng(i).standard_normal((1, width)).astype(np.float32)
        request = encode_request(model, {"x": x})
        with grpc.insecure_channel(address) as channel:
            call = channel.unary_unary(INFER)
            call(request, timeout=30)  # connect + warm
            start.wait()
            mine = latencies[i]
            try:
                while not stop.is_set():
                    t0 = time.perf_counter()
                    call(request, timeout=30)
                    mine.append(time.perf_counter() - t0)
            except grpc.RpcError as exc:
                errors.append(exc)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start.wait()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(60)
    if errors:
        raise RuntimeError(f"{model}: {len(errors)} client(s) failed: {errors[0]}")
    samples = [s for mine in latencies for s in mine]
    return len(samples), samples


def check_results(address: str, width: int) -> None:
    """Both models must return the same y for the same x (batched rows split back correctly)."""
    x = np.random.default_rng(7).standard_normal((3, width)).astype(np.float32)
    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(INFER)
        ys = [decode_response(call(encode_request(m, {"x": x}), timeout=30))[1]["y"] for m in MODES]
    np.testing.assert_allclose(ys[0], ys[1], rtol=1e-5, atol=1e-5)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=5.0, help="per mode per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--width", type=int, default=1024, help="d of the MatMul layers")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--delay-us", type=int, default=2000)
    parser.add_argument("--intra-op-threads", type=int, default=1, help="ONNX Runtime threads per call")
    parser.add_argument("--quick", action="store_true", help="1 round of 2 s")
    parser.add_argument("--out", type=Path, help="write results as JSON")
    parser.add_argument("--markdown", type=Path, help="write the table, command and machine as Markdown")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seconds = 1, 2.0

    models = Path(tempfile.mkdtemp(prefix="node-batching-")) / "models"
    engine = f"engine: {{type: onnxruntime, intra_op_threads: {args.intra_op_threads}}}\n"
    batching = (
        f"dynamic_batching: {{max_batch_size: {args.max_batch}, max_queue_delay_us: {args.delay_us}}}\n"
    )
    for name, yaml_text in (("mlp", engine), ("mlp_batched", engine + batching)):
        write_matmul_model(
            models, name, width=args.width, layers=args.layers, relu=True, model_yaml=yaml_text
        )
    metrics_port = free_port()
    done: dict[str, int] = dict.fromkeys(MODES, 0)
    elapsed: dict[str, float] = dict.fromkeys(MODES, 0.0)
    lat: dict[str, list[float]] = {m: [] for m in MODES}
    with node_process(models, free_port(), metrics_port, workers=2 * args.clients) as address:
        check_results(address, args.width)
        calls0, merged0 = batch_counts(metrics_port, "mlp_batched")
        for _ in range(args.rounds):
            for model in MODES:
                t0 = time.perf_counter()
                n, samples = drive(address, model, args.clients, args.seconds, args.width)
                elapsed[model] += time.perf_counter() - t0
                done[model] += n
                lat[model] += samples
        calls, merged = batch_counts(metrics_port, "mlp_batched")
    mean_batch = (merged - merged0) / max(calls - calls0, 1.0)

    cpu = platform.processor() or platform.machine()
    machine = f"{cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    summary: dict[str, Any] = {"machine": machine, "args": vars(args) | {"out": None, "markdown": None}}
    rows = [
        "| mode | requests | requests/s | p50 (ms) | p99 (ms) | requests per engine call |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for model, label in MODES.items():
        rps = done[model] / elapsed[model]
        p50, p99 = (float(np.percentile(lat[model], q)) * 1e3 for q in (50, 99))
        per_call = mean_batch if model == "mlp_batched" else 1.0
        summary[model] = {
            "requests": done[model],
            "rps": rps,
            "p50_ms": p50,
            "p99_ms": p99,
            "per_call": per_call,
        }
        rows.append(f"| {label} | {done[model]} | {rps:.0f} | {p50:.2f} | {p99:.2f} | {per_call:.2f} |")
    ratio = summary["mlp_batched"]["rps"] / summary["mlp"]["rps"]
    p50_ratio = summary["mlp"]["p50_ms"] / summary["mlp_batched"]["p50_ms"]
    summary["throughput_ratio"] = ratio
    table = "\n".join(rows)
    verdict = (
        f"throughput with / without batching: {ratio:.2f}x; p50 latency without / with: {p50_ratio:.2f}x"
    )
    print(table)
    print(f"\n{verdict}")
    print(f"machine: {machine}")
    if args.out:
        args.out.write_text(json.dumps(summary, indent=2))
    if args.markdown:
        command = "python bench/node_batching.py " + " ".join(sys.argv[1:])
        args.markdown.write_text(
            "## Node dynamic batching\n\n"
            f"Command: `{command}`\n"
            f"Machine: {machine}.\n"
            f"Model: {args.layers} x (MatMul [{args.width}, {args.width}] + Relu), FP32, one row per "
            f"request; {args.clients} closed-loop clients; ONNX Runtime CPU, {args.intra_op_threads} "
            f"intra-op thread(s) per call; batching: max_batch_size {args.max_batch}, "
            f"max_queue_delay_us {args.delay_us}; "
            f"{args.rounds} round(s) x {args.seconds:g} s per mode, alternating.\n\n"
            f"{table}\n\n{verdict}\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
