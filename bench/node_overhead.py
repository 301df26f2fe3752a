"""What a node adds on top of gRPC itself: one ONNX identity model behind four servers.

    python bench/node_overhead.py                      # all four, 1.5 KB and 1 MiB
    python bench/node_overhead.py --skip-mlserver      # without building .venv-mlserver

(a) in-process engine call (ONNX Runtime, no RPC)
(b) a bare gRPC echo server returning the request bytes (the floor: same payload, no work)
(c) ``moesaic node`` serving the model
(d) Seldon MLServer 1.7.1 serving the same ONNX file through a small MLModel class; it runs
    from its own virtualenv ``.venv-mlserver`` (created on demand with
    ``pip install mlserver==1.7.1 onnxruntime``), since its ``inference.*`` protobuf package
    clashes with moesaic's in one process.
(e) with ``--baseline DIR``: the node of another checkout (e.g. ``git worktree add``)
(f) with ``--floor-check``: the node's own gRPC server (options, thread pool, every service)
    with (b)'s handler, which shows whether (b) is a fair floor

Every server runs in its own process; one client (blocking gRPC channel, raw bytes, one
request at a time) drives (b)-(f), interleaved in chunks of 20 requests so machine noise hits
all alike.
Prints p50/p99 and ratios to the echo floor, then a copy check at 4 MB (tracemalloc: bytes
the node's decode and encode allocate per request).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
from onnx import TensorProto, helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import machine, write_results  # noqa: E402
from moesaic.fleet import free_port  # noqa: E402
from moesaic.nodes.codec import (  # noqa: E402
    decode_request,
    decode_response,
    decode_tensor,
    encode_request,
    encode_response,
)
from moesaic.proto import inference_pb2  # noqa: E402

MLSERVER_VENV = ROOT / ".venv-mlserver"
INFER = "/inference.GRPCInferenceService/ModelInfer"
MAX = 64 << 20
CHUNK = 20
OPTIONS = [("grpc.max_receive_message_length", MAX), ("grpc.max_send_message_length", MAX)]

MLSERVER_MODEL = """
import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxModel(MLModel):
    async def load(self) -> bool:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        self.session = ort.InferenceSession("model.onnx", opts, providers=["CPUExecutionProvider"])
        self.names = [o.name for o in self.session.get_outputs()]
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        feed = {i.name: NumpyCodec.decode_input(i) for i in payload.inputs}
        outs = self.session.run(self.names, feed)
        return InferenceResponse(
            model_name=self.name,
            outputs=[NumpyCodec.encode_output(name=n, payload=o) for n, o in zip(self.names, outs)],
        )
"""


def write_model(folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_out"])],
        "echo",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("x_out", TensorProto.FLOAT, ["n"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "model.yaml").write_text("engine: {type: onnxruntime, intra_op_threads: 1}\n")


def serve_echo(port: int) -> None:
    """The floor: a thread-pool gRPC server whose ModelInfer returns the request bytes."""
    server = grpc.server(futures.ThreadPoolExecutor(8), options=OPTIONS)
    handler = grpc.unary_unary_rpc_method_handler(lambda data, ctx: data)
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler("inference.GRPCInferenceService", {"ModelInfer": handler}),)
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    server.start()
    server.wait_for_termination()


def serve_node_echo(port: int, models: Path) -> None:
    """The floor's fairness check: a moesaic node server (its options, thread pool and services)
    whose ModelInfer returns the request bytes, as the echo's does."""
    import threading

    from moesaic.nodes.config import load_node_config
    from moesaic.nodes.server import NodeServer
    from moesaic.nodes.servicer import InferenceServicer

    InferenceServicer.model_infer = lambda self, data, context: data  # type: ignore[method-assign]
    node = NodeServer(load_node_config(overrides={"listen": f"127.0.0.1:{port}", "models": str(models)}))
    node.start()
    threading.Event().wait()


def wait_model_ready(
    address: str, model: str | None, proc: subprocess.Popen[Any], timeout: float = 120
) -> None:
    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        ready = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelReady",
            request_serializer=inference_pb2.ModelReadyRequest.SerializeToString,
            response_deserializer=inference_pb2.ModelReadyResponse.FromString,
        )
        echo = channel.unary_unary(INFER)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            with contextlib.suppress(grpc.RpcError):
                if model is None:
                    echo(b"", timeout=1)
                    return
                if ready(inference_pb2.ModelReadyRequest(name=model), timeout=1).ready:
                    return
            time.sleep(0.2)
    raise TimeoutError(f"{address} not ready after {timeout} s")


@contextlib.contextmanager
def server_process(
    command: list[str], address: str, model: str | None, cwd: Path | None = None, tree: Path = ROOT
) -> Iterator[None]:
    # The tree first, then whatever the caller's PYTHONPATH holds (e.g. carried wheels).
    path = os.pathsep.join(p for p in (str(tree), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_model_ready(address, model, proc)
        yield
    except Exception:
        proc.kill()
        print(proc.communicate(timeout=10)[1].decode()[-3000:], file=sys.stderr)
        raise
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()


def ensure_mlserver_venv() -> Path:
    python = MLSERVER_VENV / "bin" / "python"
    mlserver = MLSERVER_VENV / "bin" / "mlserver"
    if not mlserver.exists():
        print(f"creating {MLSERVER_VENV} (pip install mlserver==1.7.1 onnxruntime) ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "venv", str(MLSERVER_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "mlserver==1.7.1", "onnxruntime"], check=True
        )
    return mlserver


def mlserver_folder(root: Path, model_dir: Path, grpc_port: int) -> Path:
    folder = root / "mlserver"
    (folder / "echo").mkdir(parents=True)
    (folder / "echo" / "model.onnx").write_bytes((model_dir / "model.onnx").read_bytes())
    (folder / "echo" / "onnx_model.py").write_text(MLSERVER_MODEL)
    (folder / "settings.json").write_text(
        json.dumps(
            {
                "grpc_port": grpc_port,
                "grpc_max_message_length": MAX,
                "http_port": free_port(),
                "metrics_port": free_port(),
                "parallel_workers": 0,
            }
        )
    )
    (folder / "echo" / "model-settings.json").write_text(
        json.dumps({"name": "echo", "implementation": "onnx_model.OnnxModel"})
    )
    return folder


def measure(call: Callable[[], Any], iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        call()
    samples = []
    for _ in range(iterations):
        start = time.perf_counter()
        call()
        samples.append(time.perf_counter() - start)
    return samples


def check_reply(name: str, reply: bytes, array: np.ndarray) -> None:
    """Every server must really return the tensor (raw or typed contents)."""
    if name in ("echo", "node_echo"):
        return
    _, outputs = decode_response(reply)
    np.testing.assert_array_equal(np.asarray(outputs["x_out"], np.float32).reshape(-1), array)


def copy_check(nbytes: int) -> dict[str, float]:
    """Bytes allocated per request by the node's decode (+validation) and encode, vs protobuf."""
    array = np.random.default_rng(0).random(nbytes // 4, dtype=np.float32)
    data = encode_request("echo", {"x": array})
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    header, raws = decode_request(data)
    view = decode_tensor("x", "FP32", tuple(header.inputs[0].shape), raws[0])
    decode_peak = tracemalloc.get_traced_memory()[1] - base
    shares = bool(np.shares_memory(view, np.frombuffer(data, np.uint8)))
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    reply = encode_response("echo", {"x_out": array}, parameters={"compute_ms": 1.0})
    encode_peak = tracemalloc.get_traced_memory()[1] - base
    del reply
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    parsed = inference_pb2.ModelInferRequest.FromString(data)
    pb_view = np.frombuffer(parsed.raw_input_contents[0], np.float32)
    pb_decode_peak = tracemalloc.get_traced_memory()[1] - base
    del parsed, pb_view
    tracemalloc.stop()
    return {
        "tensor_bytes": float(array.nbytes),
        "decode_alloc_bytes": float(decode_peak),
        "decode_shares_request_memory": float(shares),
        "encode_alloc_bytes": float(encode_peak),
        "protobuf_decode_alloc_bytes": float(pb_decode_peak),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve-echo", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--serve-node-echo", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--floor-check",
        action="store_true",
        help="also (f): the node's gRPC server with the echo's handler, to show the floor is fair",
    )
    parser.add_argument("--iterations", type=int, default=1000, help="requests per target per size at 1 KB")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (samples are pooled)")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout of moesaic (e.g. `git worktree add /tmp/base main~3`): its node runs "
        "as target (e), interleaved with the others, for a before/after in one run",
    )
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/node_overhead.json)")
    args = parser.parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo)
        return 0
    if args.serve_node_echo:
        serve_node_echo(int(args.serve_node_echo[0]), Path(args.serve_node_echo[1]))
        return 0

    sizes = {"1.5 KB": 1536, "1 MiB": 1 << 20}
    tmp = Path(tempfile.mkdtemp(prefix="node-overhead-"))
    models = tmp / "models"
    write_model(models / "echo")
    ports = {t: free_port() for t in ("echo", "node", "mlserver", "baseline", "node_echo")}
    stack = contextlib.ExitStack()
    targets = ["echo", "node"]
    stack.enter_context(
        server_process(
            [sys.executable, __file__, "--serve-echo", str(ports["echo"])], f"127.0.0.1:{ports['echo']}", None
        )
    )
    stack.enter_context(
        server_process(
            [sys.executable, "-m", "moesaic", "--log-level", "WARNING", "node", "--models", str(models),
             "--listen", f"127.0.0.1:{ports['node']}"],
            f"127.0.0.1:{ports['node']}",
            "echo",
        )
    )  # fmt: skip
    if args.baseline:
        stack.enter_context(
            server_process(
                [sys.executable, "-m", "moesaic", "--log-level", "WARNING", "node", "--models", str(models),
                 "--listen", f"127.0.0.1:{ports['baseline']}"],
                f"127.0.0.1:{ports['baseline']}",
                "echo",
                cwd=args.baseline.resolve(),  # `python -m` imports from the working directory first
                tree=args.baseline.resolve(),
            )
        )  # fmt: skip
        targets.append("baseline")
    if args.floor_check:
        stack.enter_context(
            server_process(
                [sys.executable, __file__, "--serve-node-echo", str(ports["node_echo"]), str(models)],
                f"127.0.0.1:{ports['node_echo']}",
                "echo",
            )
        )
        targets.append("node_echo")
    if not args.skip_mlserver:
        mlserver = ensure_mlserver_venv()
        folder = mlserver_folder(tmp, models / "echo", ports["mlserver"])
        stack.enter_context(
            server_process(
                [str(mlserver), "start", str(folder)],
                f"127.0.0.1:{ports['mlserver']}",
                "echo",
                cwd=folder / "echo",
            )
        )
        targets.append("mlserver")

    from moesaic.runtime.engine import create_engine

    engine = create_engine(
        {"type": "onnxruntime", "providers": ["CPUExecutionProvider"], "intra_op_threads": 1}, models / "echo"
    )
    engine.load()
    results: dict[str, dict[str, list[float]]] = {}
    with stack:
        channels = {t: grpc.insecure_channel(f"127.0.0.1:{ports[t]}", options=OPTIONS) for t in targets}
        calls = {t: ch.unary_unary(INFER) for t, ch in channels.items()}
        for label, nbytes in sizes.items():
            array = np.random.default_rng(1).random(nbytes // 4, dtype=np.float32)
            request = encode_request("echo", {"x": array})
            iterations = args.iterations if nbytes <= 4096 else max(args.iterations // 5, 100)
            res = results[label] = {"engine": [], **{t: [] for t in targets}}
            for t in targets:
                check_reply(t, calls[t](request, timeout=30), array)
            for t in targets:  # warm-up
                measure(functools.partial(calls[t], request, timeout=30), 20, 0)
            # Interleaved in chunks of CHUNK requests, so a burst of machine noise (this is a
            # shared VM) lands on every target alike instead of on whichever ran then.
            for _ in range(args.rounds * iterations // CHUNK):
                res["engine"] += measure(functools.partial(engine.infer, {"x": array}), CHUNK, 0)
                for t in targets:
                    res[t] += measure(functools.partial(calls[t], request, timeout=30), CHUNK, 0)
        for ch in channels.values():
            ch.close()
    engine.close()

    names = {"engine": "(a) in-process engine", "echo": "(b) gRPC echo (floor)", "node": "(c) moesaic node",
             "mlserver": "(d) MLServer 1.7.1", "baseline": f"(e) node at {args.baseline}",
             "node_echo": "(f) node's server, echo handler"}  # fmt: skip
    summary: dict[str, Any] = {"machine": machine(), "sizes": {}}
    lines = [
        "| payload | server | p50 (us) | p99 (us) | p50 / floor | p99 / floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for label, res in results.items():
        floor50, floor99 = (float(np.percentile(res["echo"], q)) * 1e6 for q in (50, 99))
        summary["sizes"][label] = {}
        for t, samples in res.items():
            p50, p99 = (float(np.percentile(samples, q)) * 1e6 for q in (50, 99))
            summary["sizes"][label][t] = {"p50_us": p50, "p99_us": p99, "n": len(samples)}
            ratios = f"{p50 / floor50:.2f}x | {p99 / floor99:.2f}x"
            lines.append(f"| {label} | {names[t]} | {p50:.0f} | {p99:.0f} | {ratios} |")
    copies = copy_check(4 << 20)
    summary["copy_check_4MB"] = copies
    print("\n".join(lines))
    print(
        f"\ncopy check, 4 MB tensor: node decode allocates {copies['decode_alloc_bytes'] / 1e3:.1f} kB "
        f"(view shares request memory: {bool(copies['decode_shares_request_memory'])}); protobuf decode "
        f"{copies['protobuf_decode_alloc_bytes'] / 1e6:.1f} MB. Node encode allocates "
        f"{copies['encode_alloc_bytes'] / 1e6:.1f} MB (the one reply buffer gRPC sends)."
    )
    print(f"machine: {summary['machine']}")
    print(f"raw results: {write_results('node_overhead', summary, out=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
