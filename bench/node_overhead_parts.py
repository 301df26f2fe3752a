"""Where a node's round trip goes above a bare gRPC echo: the node with parts of its path left out.

    python bench/node_overhead_parts.py                  # 1.5 KB, 3000 requests x 3 rounds
    python bench/node_overhead_parts.py --bytes 1048576  # 1 MiB

Each variant is a ``moesaic node`` process (the identity model of bench/node_overhead.py) whose
``ModelInfer`` does less than the real one; one client drives them all, interleaved in chunks
of 20 requests, beside the bare echo server of bench/node_overhead.py:

    echo       the floor: a bare gRPC server returning the request bytes
    server     the node's own gRPC server (options, pool, services) returning the request bytes
    codec      + decode and validate the request, write the reply (no data plane, no engine)
    plane      + the data plane (queue, cost meter, stages, version hold), engine left out
    node       the real node

Differences between neighbours are what each part costs on the request path, caches as cold
as they are between real requests (a loop of one part in-process is several times faster).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import grpc
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.node_overhead import CHUNK, INFER, OPTIONS, measure, server_process, write_model  # noqa: E402
from moesaic.fleet import free_port  # noqa: E402
from moesaic.nodes.codec import encode_request  # noqa: E402
from moesaic.nodes.wire import RAW_INPUT_FIELD  # noqa: E402

VARIANTS = ("echo", "server", "codec", "plane", "node")


def serve(variant: str, port: int, models: Path) -> None:
    """Serve ``variant`` on ``port`` until killed."""
    from moesaic.nodes.config import load_node_config
    from moesaic.nodes.served import ServedModel
    from moesaic.nodes.server import NodeServer
    from moesaic.nodes.servicer import InferenceServicer

    def codec_only(self: InferenceServicer, data: bytes, context: Any) -> bytes:
        request = self.validator.decode(data, RAW_INPUT_FIELD)
        writer = self._writers.get(request.model) or self._writer(request.model)
        outputs = {"x_out": request.inputs["x"]}
        return writer.encode((1.0, 0.0, 1.0, 0.0), (1,), outputs)

    if variant == "server":
        InferenceServicer.model_infer = lambda self, data, context: data  # type: ignore[method-assign]
    elif variant == "codec":
        InferenceServicer.model_infer = codec_only  # type: ignore[method-assign]
    elif variant == "plane":
        ServedModel.run = lambda self, inputs: {"x_out": inputs["x"]}  # type: ignore[method-assign,assignment]
    node = NodeServer(load_node_config(overrides={"listen": f"127.0.0.1:{port}", "models": str(models)}))
    node.start()
    threading.Event().wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--bytes", type=int, default=1536, help="request tensor bytes (default 1536)")
    parser.add_argument("--iterations", type=int, default=3000, help="requests per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.serve:
        variant, port, models = args.serve
        if variant == "echo":
            from bench.node_overhead import serve_echo

            serve_echo(int(port))
        else:
            serve(variant, int(port), Path(models))
        return 0

    models = Path(tempfile.mkdtemp(prefix="node-parts-")) / "models"
    write_model(models / "echo")
    ports = {v: free_port() for v in VARIANTS}
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    request = encode_request(
        "echo", {"x": np.random.default_rng(1).random(args.bytes // 4, dtype=np.float32)}
    )
    with contextlib.ExitStack() as stack:
        for v in VARIANTS:
            command = [sys.executable, __file__, "--serve", v, str(ports[v]), str(models)]
            stack.enter_context(
                server_process(command, f"127.0.0.1:{ports[v]}", None if v == "echo" else "echo")
            )
        calls = {
            v: functools.partial(
                stack.enter_context(
                    grpc.insecure_channel(f"127.0.0.1:{ports[v]}", options=OPTIONS)
                ).unary_unary(INFER),
                request,
                timeout=30,
            )
            for v in VARIANTS
        }
        for v in VARIANTS:
            measure(calls[v], 100, 0)
        for _ in range(args.rounds * args.iterations // CHUNK):
            for v in VARIANTS:
                samples[v] += measure(calls[v], CHUNK, 0)
    floor = float(np.percentile(samples["echo"], 50))
    previous = floor
    print(f"{args.bytes} B request, {len(samples['echo'])} requests per variant")
    print("| variant | p50 (us) | p50 / echo | step (us) |\n|---|---:|---:|---:|")
    for v in VARIANTS:
        p50 = float(np.percentile(samples[v], 50))
        print(f"| {v} | {p50 * 1e6:.0f} | {p50 / floor:.2f}x | {(p50 - previous) * 1e6:+.0f} |")
        previous = p50
    return 0


if __name__ == "__main__":
    sys.exit(main())
