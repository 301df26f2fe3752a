"""PPN segmentation + reconstruction of one frame: sequential vs parallel on two GPUs.

PPN-sized networks (U-Net with skips, 31 M parameters; encoder-decoder without skips, 28 M
parameters at the default ``--rec-width 64``, whose time on an H100 is within 12 % of the
U-Net's, so the overlap bound is ~1.9; ``--rec-width 0`` widens it until the FLOPs match),
input 16 x 1024 x 1024, batch 1. Every network runs as a CUDA graph captured after warm-up;
timing synchronises every device involved (``torch.cuda.synchronize``) around N replays, and
CUDA events time each network alone. Rows:

* sequential: both graphs on cuda:0, one after the other;
* parallel, 2 GPUs: segmentation graph on cuda:0, reconstruction graph on cuda:1, both
  launched, then both devices synchronised;
* 2 streams, 1 GPU: both graphs on cuda:0, each on its own stream;
* eager (no graphs) parallel on 2 GPUs from one thread, for reference;
* GPU BEV encoding of a 120k-point scan (PPN occupancy) vs the networks' time.

Targets: speedup >= 1.9x and >= 97 % of the overlap bound (t_seg + t_rec) / max(t_seg, t_rec).

    python bench/ppn_parallel.py --out $OUT/ppn_parallel.json            # 2 GPUs
    python bench/ppn_parallel.py --dtype bf16 --out $OUT/ppn_parallel_bf16.json
    python bench/ppn_parallel.py --device cpu --quick                    # smoke test

Needs torch + numpy only (moesaic's network and BEV modules are loaded by file path).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str, rel: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, ROOT / rel)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


networks = _load("ppn_networks", "moesaic/models/ppn/networks.py")
bev = _load("ppn_bev", "moesaic/datasets/bev.py")


def conv_flops(model: torch.nn.Module, shape: tuple[int, ...]) -> float:
    """Multiply-accumulates of the conv layers for one input of ``shape`` (measured with hooks)."""
    total = 0.0

    def hook(mod: torch.nn.Module, inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, torch.nn.Conv2d | torch.nn.ConvTranspose2d):
            k = mod.kernel_size[0] * mod.kernel_size[1]
            cin = mod.in_channels // mod.groups
            spatial = (
                out.shape[-1] * out.shape[-2]
                if isinstance(mod, torch.nn.Conv2d)
                else inp[0].shape[-1] * inp[0].shape[-2]
            )
            total += float(spatial * k * cin * mod.out_channels)

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(torch.zeros(shape))
    for h in handles:
        h.remove()
    return total


def balanced_rec_width(in_ch: int, probe: int = 64) -> tuple[int, float, float]:
    """Width of the reconstruction net whose conv FLOPs best match the large U-Net's."""
    seg = networks.SegmentationNet(in_ch, 5, networks.SIZES["large"])
    target = conv_flops(seg, (1, in_ch, probe, probe))
    best = (64, float("inf"), 0.0)
    for width in range(64, 97, 2):
        rec = networks.ReconstructionNet(in_ch, networks.NetworkSize(width, 4))
        flops = conv_flops(rec, (1, in_ch, probe, probe))
        if abs(flops - target) < best[1]:
            best = (width, abs(flops - target), flops / target)
    return best[0], target, best[2]


class Graphed:
    """A network on one device, captured as a CUDA graph (or run eagerly on CPU / when asked)."""

    def __init__(
        self, net: torch.nn.Module, x: torch.Tensor, dtype: torch.dtype, *, graph: bool = True
    ) -> None:
        self.net = net.to(x.device).eval()
        self.x = x
        self.dtype = dtype
        self.device = x.device
        self.graph: torch.cuda.CUDAGraph | None = None
        self.out: torch.Tensor | None = None
        if x.device.type == "cuda" and graph:
            # Warm-up and capture with this GPU current: torch.cuda.graph captures on the
            # current device's stream, and a network on another GPU would break the capture.
            with torch.cuda.device(x.device):
                side = torch.cuda.Stream(x.device)
                side.wait_stream(torch.cuda.current_stream(x.device))
                with torch.cuda.stream(side):
                    for _ in range(3):
                        self._forward()
                torch.cuda.current_stream(x.device).wait_stream(side)
                torch.cuda.synchronize(x.device)
                self.graph = torch.cuda.CUDAGraph()
                # The default capture stream is created once, on the first GPU that captured:
                # a graph for another GPU needs a stream of its own.
                with torch.cuda.graph(self.graph, stream=torch.cuda.Stream(x.device)):
                    self.out = self._forward()
        else:
            for _ in range(2):
                self._forward()

    @torch.inference_mode()
    def _forward(self) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return self.net(self.x)

    def run(self) -> None:
        if self.graph is not None:
            with torch.cuda.device(self.device):  # replay on this GPU's current stream
                self.graph.replay()
        else:
            self.out = self._forward()


def sync(devices: list[torch.device]) -> None:
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def wall(fn: Callable[[], None], devices: list[torch.device], iters: int) -> float:
    """Milliseconds per call: synchronise all devices, run ``iters`` times, synchronise again."""
    fn()
    sync(devices)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(devices)
    return (time.perf_counter() - t0) * 1e3 / iters


def event_ms(g: Graphed, iters: int) -> float:
    """Milliseconds per call of one network alone (CUDA events on its device, or wall on CPU)."""
    if g.device.type != "cuda":
        return wall(g.run, [g.device], iters)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    g.run()
    torch.cuda.synchronize(g.device)
    with torch.cuda.device(g.device):
        start.record()
        for _ in range(iters):
            g.run()
        end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=1024, help="BEV side (cells)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--rec-width",
        type=int,
        default=64,
        help="reconstruction width (64 = the 28 M PPN network; 0 = FLOP-balanced)",
    )
    parser.add_argument("--quick", action="store_true", help="small input, few iterations (CPU smoke test)")
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()
    if args.quick:
        args.size, args.iters = min(args.size, 128), min(args.iters, 3)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    torch.manual_seed(0)
    # cuDNN's autotuner may allocate or synchronise inside a CUDA-graph capture (capture then
    # fails with cudaErrorStreamCaptureUnsupported): keep its heuristic algorithm choice.
    torch.backends.cudnn.benchmark = False
    n_gpu = torch.cuda.device_count() if args.device == "cuda" else 0
    if args.device == "cuda" and n_gpu == 0:
        print("no CUDA device; use --device cpu --quick", file=sys.stderr)
        return 2
    d0 = torch.device("cuda:0") if n_gpu else torch.device("cpu")
    d1 = torch.device("cuda:1") if n_gpu >= 2 else None
    width, seg_flops, ratio = balanced_rec_width(args.frames)
    if args.rec_width:
        width = args.rec_width
        rec_probe = networks.ReconstructionNet(args.frames, networks.NetworkSize(width, 4))
        ratio = conv_flops(rec_probe, (1, args.frames, 64, 64)) / seg_flops
    seg_net = networks.SegmentationNet(args.frames, 5, networks.SIZES["large"])
    rec_net = networks.ReconstructionNet(args.frames, networks.NetworkSize(width, 4))
    params = {"seg": networks.parameter_count(seg_net), "rec": networks.parameter_count(rec_net)}
    x = torch.rand(1, args.frames, args.size, args.size)
    x = (x > 0.97).float()  # occupancy-like input
    rows: dict[str, float] = {}
    seg0 = Graphed(seg_net, x.to(d0), dtype)
    rec0 = Graphed(rec_net, x.to(d0), dtype)
    t_seg = event_ms(seg0, args.iters)
    t_rec = event_ms(rec0, args.iters)
    bound = (t_seg + t_rec) / max(t_seg, t_rec)

    def sequential() -> None:
        seg0.run()
        rec0.run()

    seq_name = "sequential, 1 GPU (graphs)" if d0.type == "cuda" else "sequential, CPU (eager)"
    rows[seq_name] = t_seq = wall(sequential, [d0], args.iters)
    result: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if n_gpu else "cpu",
        "gpus": n_gpu,
        "torch": torch.__version__,
        "dtype": args.dtype,
        "input": [1, args.frames, args.size, args.size],
        "params": params,
        "rec_width": width,
        "rec_over_seg_flops": ratio,
        "t_seg_ms": t_seg,
        "t_rec_ms": t_rec,
        "overlap_bound": bound,
    }
    if d0.type == "cuda":
        s_a, s_b = torch.cuda.Stream(d0), torch.cuda.Stream(d0)

        def two_streams() -> None:
            cur = torch.cuda.current_stream(d0)
            s_a.wait_stream(cur)
            s_b.wait_stream(cur)
            with torch.cuda.stream(s_a):
                seg0.run()
            with torch.cuda.stream(s_b):
                rec0.run()
            cur.wait_stream(s_a)
            cur.wait_stream(s_b)

        rows["2 streams, 1 GPU (graphs)"] = wall(two_streams, [d0], args.iters)
    if d1 is not None:
        rec1 = Graphed(
            networks.ReconstructionNet(args.frames, networks.NetworkSize(width, 4)), x.to(d1), dtype
        )
        rec1.net.load_state_dict(rec_net.state_dict())

        def parallel() -> None:
            seg0.run()
            rec1.run()

        rows["parallel, 2 GPUs (graphs)"] = wall(parallel, [d0, d1], args.iters)
        seg_e = Graphed(seg_net, x.to(d0), dtype, graph=False)
        rec_e = Graphed(rec1.net, x.to(d1), dtype, graph=False)

        def eager() -> None:
            seg_e.run()
            rec_e.run()

        rows["parallel, 2 GPUs (eager, one thread)"] = wall(eager, [d0, d1], args.iters)
    # GPU (or CPU) BEV encoding of a 120k-point scan vs the networks
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-60, 60, (120_000, 2)), rng.uniform(-3, 3, (120_000, 1)),
                          rng.random((120_000, 1))], 1).astype(np.float32)  # fmt: skip
    tp = torch.from_numpy(pts).to(d0)
    enc_ms = wall(lambda: bev.torch_ppn_occupancy(tp), [d0], max(3, args.iters))
    host_ms = wall(lambda: bev.torch_ppn_occupancy(torch.from_numpy(pts).to(d0)), [d0], max(3, args.iters))
    result["bev_encoding_ms"] = {"on_device": enc_ms, "with_host_copy": host_ms}
    result["rows_ms"] = rows
    result["speedup"] = {k: t_seq / v for k, v in rows.items()}
    result["fraction_of_bound"] = {k: t_seq / v / bound for k, v in rows.items()}
    print(f"device: {result['device']} x {max(n_gpu, 1)}; torch {torch.__version__}; {args.dtype}; "
          f"input 1x{args.frames}x{args.size}x{args.size}")  # fmt: skip
    print(f"seg U-Net {params['seg'] / 1e6:.1f} M params: {t_seg:.3f} ms; rec enc-dec (width {width}) "
          f"{params['rec'] / 1e6:.1f} M params: {t_rec:.3f} ms; overlap bound {bound:.3f}x")  # fmt: skip
    print(f"{'configuration':40s} {'ms/frame':>10s} {'speedup':>8s} {'of bound':>9s}")
    for name, ms in rows.items():
        print(f"{name:40s} {ms:10.3f} {t_seq / ms:8.3f} {100 * t_seq / ms / bound:8.1f}%")
    print(f"BEV encoding (PPN occupancy, 120k points): {enc_ms:.3f} ms on device, {host_ms:.3f} ms with the "
          f"host->device copy; the cheaper network takes {min(t_seg, t_rec):.3f} ms")  # fmt: skip
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
