"""Camera experts on a GPU: YOLO latency at 832 px (fp16, eager vs CUDA graphs), Florence-2-base
``<OD>`` latency with random weights, and energy per image from NVML.

Needs only torch, numpy and transformers (no ultralytics): the YOLO graphs are TorchScript
programs exported beforehand with ultralytics (``--export`` does that on a machine that has
it; the files then travel under ``out/camera/``)::

    # where ultralytics is installed (CPU is fine):
    python bench/gpu_camera.py --export --yolo-n-pt runs/yolo-n/weights/best.pt
    # on the GPU machine:
    python bench/gpu_camera.py --out $OUT/gpu_camera.json
    # smoke test on CPU:
    python bench/gpu_camera.py --device cpu --quick

Florence-2 uses transformers' native ``Florence2ForConditionalGeneration`` built from a
base-sized config (DaViT + BART-base, 768 px, 577 image tokens) with random weights: nothing
is downloaded. Generation is forced to a fixed length (``--tokens``) so the number is the
cost of an ``<OD>`` answer of that length, not of whatever a random model emits.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "out" / "camera"
YOLO_FILES = {"yolo-n": ASSETS / "yolo-n-832.torchscript", "yolo-s": ASSETS / "yolo-s-832.torchscript"}


# ----------------------------------------------------------------------------- measurement


class EnergyMeter:
    """NVML total-energy counter of one GPU (mJ); ``None`` readings when unavailable."""

    def __init__(self, device: torch.device) -> None:
        self.handle: Any = None
        self.nvml: Any = None
        if device.type != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(device.index or 0)
            pynvml.nvmlDeviceGetTotalEnergyConsumption(self.handle)
            self.nvml = pynvml
        except Exception as exc:  # no NVML, or a GPU without the counter
            print(f"energy: NVML unavailable ({exc})", file=sys.stderr)
            self.handle = None

    def read(self) -> float | None:
        if self.handle is None:
            return None
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def name(self) -> str:
        return str(self.nvml.nvmlDeviceGetName(self.handle)) if self.handle is not None else ""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(
    fn: Callable[[], Any], device: torch.device, meter: EnergyMeter, *, iters: int, warmup: int
) -> dict[str, Any]:
    """Latency quantiles (ms, per call) and NVML energy per call (mJ) of ``fn``."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    e0 = meter.read()
    t_start = time.perf_counter()
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    wall = time.perf_counter() - t_start
    e1 = meter.read()
    times.sort()
    return {
        "p50_ms": statistics.median(times),
        "p90_ms": times[min(len(times) - 1, math.ceil(0.9 * len(times)) - 1)],
        "mean_ms": statistics.fmean(times),
        "per_s": iters / wall,
        "energy_mj": (e1 - e0) / iters if e0 is not None and e1 is not None else None,
        "iters": iters,
    }


# ----------------------------------------------------------------------------- YOLO


def bench_yolo(
    path: Path, device: torch.device, half: bool, imgsz: int, meter: EnergyMeter, iters: int, warmup: int
) -> list[dict[str, Any]]:
    model = torch.jit.load(str(path), map_location=device).eval()
    dtype = torch.float16 if half else torch.float32
    model = model.half() if half else model.float()
    x = torch.rand(1, 3, imgsz, imgsz, device=device, dtype=dtype)
    rows = []
    with torch.inference_mode():
        rows.append({"mode": "eager", **measure(lambda: model(x), device, meter, iters=iters, warmup=warmup)})
        if device.type == "cuda":
            try:
                rows.append({"mode": "cuda graph", **_cuda_graph(model, x, device, meter, iters, warmup)})
            except RuntimeError as exc:  # keep the eager numbers when capture is not possible
                print(f"{path.name}: CUDA graph capture failed: {exc}", file=sys.stderr)
    return rows


def _cuda_graph(
    model: Any, x: torch.Tensor, device: torch.device, meter: EnergyMeter, iters: int, warmup: int
) -> dict[str, Any]:
    """Capture one forward pass in a CUDA graph (after side-stream warm-up) and time replays."""
    static_in = x.clone()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(static_in)
    torch.cuda.current_stream(device).wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = model(static_in)

    def replay() -> Any:
        static_in.copy_(x)  # a new frame arrives in the captured input buffer
        graph.replay()
        return static_out

    return measure(replay, device, meter, iters=iters, warmup=warmup)


def export_torchscript(pt_n: str, imgsz: int) -> None:
    """Write the TorchScript programs (run where ultralytics is installed)."""
    sys.path.insert(0, str(REPO))
    from moesaic.models.detector.offline import import_ultralytics

    ultralytics = import_ultralytics()
    ASSETS.mkdir(parents=True, exist_ok=True)
    sources = {"yolo-n": pt_n or "yolov8n.yaml", "yolo-s": "yolov8s.yaml"}
    for name, source in sources.items():
        model = ultralytics.YOLO(source, task="detect")
        if source.endswith(".yaml"):  # random weights: latency does not depend on their values
            tmp = ASSETS / f"{name}-random.pt"
            model.save(str(tmp))
            model = ultralytics.YOLO(str(tmp), task="detect")
        out = Path(model.export(format="torchscript", imgsz=imgsz, optimize=False))
        # Stored in fp16 (half the bytes to carry); bench_yolo casts to the precision it measures.
        torch.jit.save(torch.jit.load(str(out)).half(), str(YOLO_FILES[name]))
        out.unlink()
        if source.endswith(".yaml"):
            tmp.unlink()
        print(f"{name}: {YOLO_FILES[name]} ({YOLO_FILES[name].stat().st_size / 1e6:.1f} MB) from {source}")


# ----------------------------------------------------------------------------- Florence-2


def bench_florence2(
    device: torch.device, half: bool, quick: bool, tokens: int, meter: EnergyMeter, iters: int
) -> dict[str, Any]:
    sys.path.insert(0, str(REPO))
    from transformers import Florence2ForConditionalGeneration

    from moesaic.models.florence2.tiny import base_config

    torch.manual_seed(0)
    config = base_config()
    model = Florence2ForConditionalGeneration(config).eval()
    model = model.to(device, torch.float16 if half else torch.float32)
    side = 384 if quick else 768
    n_image = (side // 32) ** 2 + 1
    prompt = torch.randint(3, 50000, (12,))
    ids = torch.cat(
        [torch.full((n_image,), config.image_token_id), torch.tensor([0]), prompt, torch.tensor([2])]
    )
    input_ids = ids[None].to(device)
    pixels = torch.rand(1, 3, side, side, device=device, dtype=model.dtype)
    gen = {"max_new_tokens": tokens, "min_new_tokens": tokens, "do_sample": False, "num_beams": 1}

    def run() -> Any:
        return model.generate(
            input_ids=input_ids, pixel_values=pixels, attention_mask=torch.ones_like(input_ids), **gen
        )

    with torch.inference_mode():
        out = run()
        generated = out.shape[1] - (1 if model.config.is_encoder_decoder else input_ids.shape[1])
        stats = measure(run, device, meter, iters=iters, warmup=1)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"image_px": side, "image_tokens": n_image, "new_tokens": generated, "params_m": params, **stats}


# ----------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:1 or cpu")
    ap.add_argument(
        "--quick", action="store_true", help="few iterations, small Florence-2 image (smoke test)"
    )
    ap.add_argument("--imgsz", type=int, default=832)
    ap.add_argument("--tokens", type=int, default=32, help="generated tokens per Florence-2 <OD> call")
    ap.add_argument("--fp32", action="store_true", help="measure in fp32 instead of fp16")
    ap.add_argument("--yolo-n", default=str(YOLO_FILES["yolo-n"]))
    ap.add_argument("--yolo-s", default=str(YOLO_FILES["yolo-s"]))
    ap.add_argument("--skip-florence2", action="store_true")
    ap.add_argument("--export", action="store_true", help="export the TorchScript files (needs ultralytics)")
    ap.add_argument("--yolo-n-pt", default="", help="trained YOLO-n .pt to export (default: random yolov8n)")
    ap.add_argument("--out", default="", help="write JSON here")
    args = ap.parse_args()
    if args.export:
        export_torchscript(args.yolo_n_pt, args.imgsz)
        return 0
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu", file=sys.stderr)
        return 2
    half = device.type == "cuda" and not args.fp32
    meter = EnergyMeter(device)
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    iters, warmup = (2, 1) if args.quick else (200, 20)
    imgsz = args.imgsz  # the TorchScript programs are traced at this size
    results: dict[str, Any] = {
        "device": str(device),
        "card": card,
        "precision": "fp16" if half else "fp32",
        "yolo": {},
    }
    rows = []
    for name, path in (("yolo-n", Path(args.yolo_n)), ("yolo-s", Path(args.yolo_s))):
        if not path.is_file():
            print(
                f"{name}: {path} missing (run --export where ultralytics is installed); skipped",
                file=sys.stderr,
            )
            continue
        for r in bench_yolo(path, device, half, imgsz, meter, iters, warmup):
            results["yolo"].setdefault(name, []).append({**r, "imgsz": imgsz})
            rows.append((f"{name} {imgsz}px", r["mode"], r))
    if not args.skip_florence2:
        try:
            fl = bench_florence2(
                device, half, args.quick, 4 if args.quick else args.tokens, meter, 1 if args.quick else 20
            )
            results["florence2"] = fl
            rows.append((f"florence2-base <OD> {fl['image_px']}px, {fl['new_tokens']} tok", "generate", fl))
        except Exception as exc:  # report what failed, keep the YOLO numbers
            print(f"florence2: failed: {exc!r}", file=sys.stderr)
            results["florence2"] = {"error": repr(exc)}

    print(f"\n{card} ({results['precision']}, torch {torch.__version__})")
    print(f"{'model':<40} {'mode':<11} {'p50 ms':>9} {'p90 ms':>9} {'per s':>8} {'mJ/img':>9}")
    for name, mode, r in rows:
        energy = f"{r['energy_mj']:.1f}" if r.get("energy_mj") is not None else "n/a"
        print(f"{name:<40} {mode:<11} {r['p50_ms']:>9.2f} {r['p90_ms']:>9.2f} {r['per_s']:>8.1f} {energy:>9}")
    ratios = []
    for name, entries in results["yolo"].items():
        by_mode = {e["mode"]: e for e in entries}
        if "cuda graph" in by_mode:
            gain = by_mode["eager"]["p50_ms"] / by_mode["cuda graph"]["p50_ms"]
            ratios.append(f"{name}: CUDA graphs {gain:.2f}x faster than eager")
    if len(results["yolo"]) == 2:
        n, s = (min(e["p50_ms"] for e in results["yolo"][k]) for k in ("yolo-n", "yolo-s"))
        ratios.append(f"yolo-s / yolo-n latency: {s / n:.2f}x")
    if "yolo-n" in results["yolo"] and device.type == "cuda":
        best = min(e["p50_ms"] for e in results["yolo"]["yolo-n"])
        ratios.append(f"yolo-n best p50 {best:.2f} ms vs target <= 3 ms: {'met' if best <= 3 else 'missed'}")
    for line in ratios:
        print(line)
    results["ratios"] = ratios
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
