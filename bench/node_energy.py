"""Attributed energy through a real node: does it add up, and is it the same under concurrency?

    python bench/node_energy.py --device cuda:0      # NVML, a compute-bound PyTorch MLP
    python bench/node_energy.py --device cpu         # the CPU's meter (RAPL, else an estimate)

The node runs as users run it (gRPC, validation, queue, engine, the cost meter reading the
device's energy source on its own thread). Idle power is measured from that source with the
load off; then one client and then four clients (another process) call back to back for
``--seconds`` each. Prints, side by side in one run: Σ attributed energy against the source's
delta minus idle x time, and each phase's mean per-request energy, its ratio to one client's,
and the coefficient of variation of the replies' figures. Raw JSON goes to
``bench/results/node_energy_{device}.json`` with command, commit and machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import write_results  # noqa: E402
from moesaic.nodes.config import load_node_config  # noqa: E402
from moesaic.nodes.server import NodeServer  # noqa: E402
from tests.helpers.energy_load import measure_energy  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda:N")
    parser.add_argument("--seconds", type=float, default=15.0, help="load per phase (default 15)")
    parser.add_argument("--idle-seconds", type=float, default=5.0, help="idle measured this long first")
    parser.add_argument(
        "--out", type=Path, help="results JSON (default bench/results/node_energy_DEVICE.json)"
    )
    args = parser.parse_args()

    models = Path(tempfile.mkdtemp(prefix="node-energy-"))
    if args.device.startswith("cuda"):
        from tests.helpers.torch_models import write_torch_mlp_model

        write_torch_mlp_model(models, "m", model_yaml=f"engine: {{type: torch, device: '{args.device}'}}\n")
        array = np.ones((512, 256), np.float32)
        workload = "PyTorch MLP 256-4096x6-16, 512 rows, CUDA graphs"
    else:
        from tests.helpers.onnx_models import write_matmul_model

        write_matmul_model(models, "m", model_yaml="engine: {type: onnxruntime, intra_op_threads: 1}\n")
        array = np.ones((64, 256), np.float32)
        workload = "ONNX 4x MatMul 256x256, 64 rows, 1 thread"
    config = load_node_config(
        env={}, overrides={"listen": "127.0.0.1:0", "models": models, "device": args.device}
    )
    node = NodeServer(config)
    node.start()
    try:
        if not node.wait_ready(120):
            raise SystemExit("node did not load its model")
        run = measure_energy(node, "m", array, seconds=args.seconds, idle_s=args.idle_seconds)
    finally:
        node.stop(grace=0)

    one = run.phases[0]
    print(f"node on {node.device.id} ({node.device.name}); energy source {run.source}; {workload}")
    print(f"idle: {run.idle_w_measured:.1f} W measured with the load off, {run.idle_w_learnt:.1f} W learnt")
    print("| clients | requests | mean mJ/request | vs 1 client | CV of replies |")
    print("|---:|---:|---:|---:|---:|")
    for phase in run.phases:
        ratio = phase.mean_mj / one.mean_mj
        print(
            f"| {phase.clients} | {len(phase.energy_mj)} | {phase.mean_mj:.1f} | {ratio:.3f}x "
            f"| {phase.cv:.3f} |"
        )
    print(
        f"over {run.seconds:.1f} s: source delta {run.device_j:.1f} J, minus idle = {run.dynamic_j:.1f} J "
        f"dynamic; attributed {run.attributed_j:.1f} J ({run.sum_error:+.1%})"
    )
    name = "node_energy_" + args.device.replace(":", "")
    print(f"raw results: {write_results(name, {'workload': workload, **run.summary()}, out=args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
