"""GPU verification of the PyTorch engine, the profiler and the NVML meter.

Builds a YOLO-sized convnet in plain torch (C2f backbone, FPN neck, anchor-free heads;
~7 M parameters; 640x640 input; output ``[B, 84, 8400]`` like YOLOv8 before NMS), exports it
as TorchScript and as a torch.export program, and profiles each through
:class:`moesaic.runtime.torch_engine.TorchEngine` with CUDA graphs on and off, measuring
latency p50/p95/p99, throughput, energy per inference (idle draw subtracted) and the idle and
loaded board power with the best meter of the device (NVML on a discrete GPU).

    python bench/gpu_profile.py --out $OUT/gpu_profile.json             # GPU, ~3 min
    python bench/gpu_profile.py --device cpu --quick --out /tmp/p.json  # CPU smoke test

Needs torch, numpy, pydantic and (for measured energy) nvidia-ml-py; no ultralytics.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from moesaic.runtime.devices import discover_device
from moesaic.runtime.energy import open_meter
from moesaic.runtime.engine import TensorSpec
from moesaic.runtime.profiler import profile_engine
from moesaic.runtime.torch_engine import TorchEngine, TorchEngineConfig, save_torch_model

# ---------------------------------------------------------------- the model


class ConvBnAct(nn.Sequential):
    def __init__(self, c_in: int, c_out: int, k: int = 3, s: int = 1) -> None:
        super().__init__(nn.Conv2d(c_in, c_out, k, s, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class Bottleneck(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.a, self.b = ConvBnAct(c, c), ConvBnAct(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.b(self.a(x))


class C2f(nn.Module):
    """Split, n bottlenecks, concatenate every intermediate, fuse (YOLOv8's block)."""

    def __init__(self, c_in: int, c_out: int, n: int) -> None:
        super().__init__()
        self.width = c_out // 2
        self.stem = ConvBnAct(c_in, c_out, 1)
        self.blocks = nn.ModuleList(Bottleneck(self.width) for _ in range(n))
        self.fuse = ConvBnAct((2 + n) * self.width, c_out, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = list(self.stem(x).split(self.width, dim=1))
        for block in self.blocks:
            parts.append(block(parts[-1]))
        return self.fuse(torch.cat(parts, dim=1))


class SPPF(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.reduce, self.pool, self.fuse = (
            ConvBnAct(c, c // 2, 1),
            nn.MaxPool2d(5, 1, 2),
            ConvBnAct(c * 2, c, 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.reduce(x)
        a = self.pool(x)
        b = self.pool(a)
        return self.fuse(torch.cat([x, a, b, self.pool(b)], dim=1))


class YoloSizedNet(nn.Module):
    """Backbone (strides 8/16/32), top-down FPN neck, per-level box (4 x 16 DFL bins) and class heads."""

    def __init__(self, classes: int = 80, width: tuple[int, ...] = (32, 64, 128, 256, 384)) -> None:
        super().__init__()
        w0, w1, w2, w3, w4 = width
        self.stem = ConvBnAct(3, w0, 3, 2)
        self.s1 = nn.Sequential(ConvBnAct(w0, w1, 3, 2), C2f(w1, w1, 1))
        self.s2 = nn.Sequential(ConvBnAct(w1, w2, 3, 2), C2f(w2, w2, 2))
        self.s3 = nn.Sequential(ConvBnAct(w2, w3, 3, 2), C2f(w3, w3, 2))
        self.s4 = nn.Sequential(ConvBnAct(w3, w4, 3, 2), C2f(w4, w4, 1), SPPF(w4))
        self.up = nn.Upsample(scale_factor=2.0, mode="nearest")
        self.register_buffer(
            "dfl_bins", torch.arange(16, dtype=torch.float32).view(1, 1, 16, 1)
        )  # moves with .to()
        self.n3 = C2f(w4 + w3, w3, 1)
        self.n2 = C2f(w3 + w2, w2, 1)
        self.box = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 64), ConvBnAct(64, 64), nn.Conv2d(64, 64, 1)) for c in (w2, w3, w4)
        )
        self.cls = nn.ModuleList(
            nn.Sequential(ConvBnAct(c, 128), ConvBnAct(128, 128), nn.Conv2d(128, classes, 1))
            for c in (w2, w3, w4)
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        p2 = self.s2(self.s1(self.stem(images)))
        p3 = self.s3(p2)
        p4 = self.s4(p3)
        f3 = self.n3(torch.cat([self.up(p4), p3], dim=1))
        f2 = self.n2(torch.cat([self.up(f3), p2], dim=1))
        outs = []
        for feat, box, cls in zip((f2, f3, p4), self.box, self.cls, strict=True):
            b = box(feat)
            bins = b.flatten(2).unflatten(1, (4, 16)).softmax(2)  # distribution focal loss bins
            dist = (bins * self.dfl_bins).sum(2)
            outs.append(torch.cat([dist, cls(feat).flatten(2).sigmoid()], dim=1))
        return torch.cat(outs, dim=2)  # [B, 4 + classes, anchors]


# ---------------------------------------------------------------- running


def export_models(folder: Path, size: int, batch: int) -> dict[str, Path]:
    """TorchScript and torch.export files of a freshly initialised net at a static shape."""
    torch.manual_seed(0)
    net = YoloSizedNet().eval()
    example = torch.zeros(batch, 3, size, size)
    with torch.no_grad():
        out_shape = tuple(net(example).shape)
    inputs = (TensorSpec("images", "FP32", (batch, 3, size, size)),)
    outputs = (TensorSpec("predictions", "FP32", out_shape),)
    files = {}
    d = folder / f"b{batch}"
    d.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        save_torch_model(torch.jit.trace(net, example), d / "model.ts", inputs=inputs, outputs=outputs)
    save_torch_model(torch.export.export(net, (example,)), d / "model.pt2", inputs=inputs, outputs=outputs)
    files["torchscript"], files["torch.export"] = d / "model.ts", d / "model.pt2"
    return files


def export_repository(root: Path, size: int, device: str, precision: str) -> Path:
    """A model repository for ``moesaic profile``: ``root/yolo_sized`` (torch.export, dynamic batch)."""
    torch.manual_seed(0)
    net = YoloSizedNet().eval()
    example = torch.zeros(2, 3, size, size)
    with torch.no_grad():
        anchors = int(net(example).shape[2])
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    folder = root / "yolo_sized"
    folder.mkdir(parents=True, exist_ok=True)
    save_torch_model(
        program,
        folder / "model.pt2",
        inputs=(TensorSpec("images", "FP32", (-1, 3, size, size)),),
        outputs=(TensorSpec("predictions", "FP32", (-1, 84, anchors)),),
    )
    (folder / "model.yaml").write_text(
        "task: benchmark\n"
        "description: YOLO-sized convnet (bench/gpu_profile.py), random weights\n"
        f"engine: {{type: torch, device: '{device}', precision: {precision}, "
        f"static_shapes: {{images: [1, 3, {size}, {size}]}}}}\n"
    )
    return folder


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = discover_device(args.device)
    cuda = device.kind == "cuda"
    size = args.size or (160 if args.quick else 640)
    runs = args.runs or (5 if args.quick else 300)
    warmup = 2 if args.quick else 30
    batches = [int(b) for b in args.batch.split(",")]
    precisions: list[Literal["fp32", "fp16", "bf16"]] = ["fp16", "fp32"] if cuda else ["fp32"]
    graph_modes = [True, False] if cuda else [False]
    params = sum(p.numel() for p in YoloSizedNet().parameters())
    limit = f"power limit {device.power_limit_watts:.0f} W"
    print(f"device {device.id}: {device.name}, {limit}, energy {device.energy_source}")
    print(f"model: YOLO-sized convnet, {params / 1e6:.2f} M parameters, input {size}x{size}")
    results = []
    with tempfile.TemporaryDirectory() as tmp, open_meter(device) as meter:
        for batch in batches:
            files = export_models(Path(tmp), size, batch)
            rng = np.random.default_rng(0)
            inputs = {"images": rng.random((batch, 3, size, size), dtype=np.float32)}
            for fmt, path in files.items():
                for precision in precisions:
                    for graphs in graph_modes:
                        config = TorchEngineConfig.model_validate(
                            {
                                "file": path.name,
                                "device": device.id if cuda else "cpu",
                                "precision": precision,
                                "cuda_graphs": graphs,
                            }
                        )
                        engine = TorchEngine(config, path.parent)
                        t0 = time.perf_counter()
                        engine.load()
                        load_s = time.perf_counter() - t0
                        try:
                            rec = profile_engine(
                                engine,
                                inputs,
                                runs=runs,
                                warmup=warmup,
                                meter=meter,
                                idle_s=args.idle_seconds,
                                min_duration_s=0.0 if args.quick else 3.0,
                                model="yolo-sized",
                                device=device.id,
                                batch_size=batch,
                            )
                            graphs_on = engine.describe().details["cuda_graphs"] == "on"
                        finally:
                            engine.close()
                        calls_per_s = rec.throughput_per_s / batch
                        loaded_w = rec.idle_watts + rec.energy_mj_per_inference / 1000 * calls_per_s
                        row = {
                            **rec.to_dict(),
                            "format": fmt,
                            "precision": precision,
                            "cuda_graphs": graphs_on,
                            "loaded_watts": loaded_w,
                            "joules_per_inference": rec.energy_mj_per_inference / 1000,
                            "load_seconds": load_s,
                        }
                        results.append(row)
                        print(
                            f"  b{batch} {fmt:12s} {precision} graphs={'on ' if graphs_on else 'off'} "
                            f"p50 {rec.latency_ms.p50:7.2f} ms  {rec.energy_mj_per_inference:8.1f} mJ/inf"
                        )
    return {
        "device": {**device.__dict__},
        "model": {"name": "yolo-sized", "parameters": params, "input": [3, size, size]},
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "energy_source": device.energy_source,
        "results": results,
    }


def table(report: dict[str, Any]) -> str:
    """Markdown table, with CUDA graphs on/off ratios side by side."""
    rows = report["results"]
    head = (
        "| batch | format | precision | CUDA graphs | p50 ms | p95 ms | p99 ms | items/s | J/inference "
        "| idle W | loaded W | p50 vs graphs off | energy vs graphs off |"
    )
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        base = next(
            (
                o
                for o in rows
                if (o["batch_size"], o["format"], o["precision"])
                == (r["batch_size"], r["format"], r["precision"])
                and not o["cuda_graphs"]
            ),
            r,
        )
        speed = base["latency_ms"]["p50"] / r["latency_ms"]["p50"]
        energy = (
            r["energy_mj_per_inference"] / base["energy_mj_per_inference"]
            if base["energy_mj_per_inference"]
            else 1.0
        )
        lat = r["latency_ms"]
        lines.append(
            f"| {r['batch_size']} | {r['format']} | {r['precision']} | {'on' if r['cuda_graphs'] else 'off'} "
            f"| {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {r['throughput_per_s']:.1f} "
            f"| {r['joules_per_inference']:.3f} | {r['idle_watts']:.1f} | {r['loaded_watts']:.1f} "
            f"| {speed:.2f}x faster | {energy:.2f}x |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--device", default="cuda:0", help="cuda:N, cpu or auto (default: cuda:0)")
    parser.add_argument("--quick", action="store_true", help="small input, few runs (CPU smoke test)")
    parser.add_argument("--size", type=int, default=0, help="input size (default 640; 160 with --quick)")
    parser.add_argument("--batch", default="1", help="comma-separated batch sizes (default: 1)")
    parser.add_argument("--runs", type=int, default=0, help="timed runs per configuration (default 300)")
    parser.add_argument("--idle-seconds", type=float, default=3.0, help="idle draw measured this long")
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    parser.add_argument(
        "--export-repo",
        type=Path,
        default=None,
        help="only write a model repository for `moesaic profile` here",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.export_repo:
        precision = "fp16" if args.device.startswith("cuda") else "fp32"
        folder = export_repository(args.export_repo, args.size or 640, args.device, precision)
        print(f"wrote {folder}")
        return 0
    report = run(args)
    text = table(report)
    dev = report["device"]
    print(
        f"\n{dev['name']} ({dev['id']}), energy source: {report['energy_source']}, torch {report['torch']}\n"
    )
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**report, "table": text}, indent=2) + "\n")
        print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
