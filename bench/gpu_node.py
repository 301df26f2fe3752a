"""The product path on real data: a real ``moesaic node``, the real client, real KITTI fixtures.

    python bench/gpu_node.py                          # --device cuda:0: plain / binding / graph
    python bench/gpu_node.py --device cpu             # the 2-core VM's figures (one variant)

For ``yolo-n`` (a 1242 x 375 KITTI camera frame, ``kitti_000008.png``) and ``ppn-seg-small``
(the KITTI scan ``kitti_000008.bin``), side by side in one run:

(a) ``bare``: a bare ONNX Runtime session on the same model file (the folder's thread count and
    no spinning, as the node's; the CUDA provider on a GPU), fed the same pre-processed tensor,
    plain ``session.run`` (a spinning session would steal the cores of the node it alternates with);
(b) ``in-process``: the same pre-processing (OpenCV letterbox / BEV encoding + ring buffer),
    the bare session and the same post-processing (vectorised NMS) in this one process;
(c) ``node compute``: ``compute_ms`` of the node's replies (pre + engine + post inside the node);
(d) ``round trip``: the real client (:class:`~moesaic.nodes.client.NodeClient`) around the call;
(e) energy per inference: the node's cost meter (``energy_mj`` of the replies, a running
    figure; and the node's ``moesaic_model_energy_joules_total`` over exactly the loop) vs the
    device counter (NVML on a GPU) over the same loop, idle subtracted.

On a GPU each model folder runs in three variants of its ``engine:`` section, one node each:
``plain`` (``io_binding: false``), ``binding`` (device buffers bound once) and ``graph``
(``cuda_graph: true``). For the breakdown, moesaic's engine with the variant's options and the
node's processor (placed on the device: BEV encoded on the GPU) also run alone in this process.
The raw samples' summary goes to ``bench/results/gpu_node_<device>.json``
(or ``--out``) through :func:`bench.record.write_results`.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.record import machine, write_results  # noqa: E402
from moesaic.fleet import ProcessTree, free_port, wait_grpc_ready  # noqa: E402
from moesaic.nodes.client import NodeClient  # noqa: E402

MODELS = ("yolo-n", "ppn-seg-small")
CHUNK = 10
VARIANTS_GPU = {
    "plain": {"io_binding": False, "cuda_graph": False},
    "binding": {"io_binding": True, "cuda_graph": False},
    "graph": {"io_binding": True, "cuda_graph": True},
}


def default_data() -> Path:
    shared = ROOT.parent / "shared" / "data" / "real"
    for candidate in (ROOT / ".benchdata", shared, Path("/work/shared/data/real")):
        if (candidate / "kitti_000008.png").is_file():
            return candidate
    return ROOT.parent / "shared" / "data" / "real"


def load_fixtures(data: Path) -> tuple[np.ndarray, np.ndarray]:
    import cv2

    bgr = cv2.imread(str(data / "kitti_000008.png"), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"{data / 'kitti_000008.png'}: cannot read the KITTI frame")
    image = np.ascontiguousarray(bgr[..., ::-1])
    scan = np.fromfile(data / "kitti_000008.bin", dtype=np.float32).reshape(-1, 4)
    return image, scan


def pct(samples: list[float], q: float) -> float:
    return float(np.percentile(samples, q)) if samples else float("nan")


def timed(call: Callable[[], Any], n: int, warmup: int = 20) -> list[float]:
    for _ in range(warmup):
        call()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        call()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


class Nvml:
    """The GPU's total-energy counter (mJ), or nothing off NVIDIA."""

    def __init__(self, index: int | None) -> None:
        self.handle: Any = None
        self.name = ""
        if index is None:
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self.handle = pynvml.nvmlDeviceGetHandleByIndex(index)
            self.name = str(pynvml.nvmlDeviceGetName(self.handle))
            self.nvml = pynvml
        except Exception as exc:
            print(f"NVML unavailable: {exc}", file=sys.stderr)
            self.handle = None

    def mj(self) -> float:
        if self.handle is None:
            return float("nan")
        return float(self.nvml.nvmlDeviceGetTotalEnergyConsumption(self.handle))

    def idle_watts(self, seconds: float = 3.0) -> float:
        e0, t0 = self.mj(), time.monotonic()
        time.sleep(seconds)
        return (self.mj() - e0) / 1e3 / (time.monotonic() - t0)


def write_variant(models: Path, out: Path, engine: dict[str, Any]) -> Path:
    """Copies of the shipped model folders with ``engine:`` options added."""
    for name in MODELS:
        folder = out / name
        folder.mkdir(parents=True)
        (folder / "model.onnx").symlink_to((models / name / "model.onnx").resolve())
        spec = yaml.safe_load((models / name / "model.yaml").read_text())
        spec["engine"] = {**spec.get("engine", {}), **engine}
        (folder / "model.yaml").write_text(yaml.safe_dump(spec))
    return out


class Baseline:
    """(a) and (b) for one model: callables running in this process, and their samples."""

    def __init__(self, name: str, provider: str, pre: Callable[[], Any], bare: Callable[[], Any],
                 pipeline: Callable[[], Any], feed: dict[str, np.ndarray],
                 request: tuple[dict[str, Any], dict[str, Any]]) -> None:  # fmt: skip
        self.name, self.provider = name, provider
        self.feed, self.request = feed, request
        self.calls = {"pre_ms": pre, "bare_ms": bare, "pipeline_ms": pipeline}
        self.samples: dict[str, list[float]] = {k: [] for k in self.calls}
        for call in self.calls.values():  # warm-up (and a full ring buffer of frames)
            for _ in range(20):
                call()
        self.reference = {k: np.asarray(v) for k, v in pipeline().items()}

    def run(self, chunk: int) -> None:
        for key, call in self.calls.items():
            self.samples[key] += timed(call, chunk, warmup=0)


def in_process(models: Path, image: np.ndarray, scan: np.ndarray, device: str) -> dict[str, Baseline]:
    """The bare session and the whole pipeline in this process, per model."""
    import onnxruntime as ort

    from moesaic.models.detector.serving import YoloProcessor
    from moesaic.models.detector.yolo_ops import letterbox
    from moesaic.models.ppn.serving import PpnBevProcessor
    from moesaic.runtime.engine import TensorSpec

    if device.startswith("cuda"):
        providers: list[Any] = [("CUDAExecutionProvider", {"device_id": int(device.split(":")[1])})]
        if hasattr(ort, "preload_dlls"):
            ort.preload_dlls(cuda=True, cudnn=True, msvc=False)
    else:
        providers = ["CPUExecutionProvider"]
    baselines: dict[str, Baseline] = {}
    for name in MODELS:
        spec = yaml.safe_load((models / name / "model.yaml").read_text())
        options = dict(spec["processor"])
        options.pop("type")
        opts = ort.SessionOptions()  # the node's session options: its threads, no spinning
        threads = spec.get("engine", {}).get("intra_op_threads")
        if threads:
            opts.intra_op_num_threads = threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
        session = ort.InferenceSession(str(models / name / "model.onnx"), opts, providers=providers)
        if device.startswith("cuda") and session.get_providers()[0] != "CUDAExecutionProvider":
            raise SystemExit(f"bare session for {name} is not on CUDA: {session.get_providers()}")
        names = [o.name for o in session.get_outputs()]
        inp = session.get_inputs()[0]
        spec_in = TensorSpec(inp.name, "FP32", tuple(d if isinstance(d, int) else -1 for d in inp.shape))
        if name == "yolo-n":
            proc: Any = YoloProcessor(options, models / name)
            proc.inputs((spec_in,))
            pre: Callable[[], Any] = lambda p=proc: letterbox(image, p.imgsz)  # noqa: E731
            request: dict[str, Any] = {"image": image}
            params: dict[str, Any] = {}
        else:
            proc = PpnBevProcessor(options, models / name)
            proc.inputs((spec_in,))
            request, params = {"points": scan}, {"sensor_id": "bench"}
            pre = lambda p=proc: p.encoder(scan)  # noqa: E731
        tensors, _ = proc.preprocess(request, params)
        feed = {k: np.asarray(v) for k, v in tensors.items()}

        def pipeline(
            p: Any = proc, s: Any = session, r: Any = request, q: Any = params, o: list[str] = names
        ) -> Any:
            engine_inputs, context = p.preprocess(r, q)
            outputs = s.run(o, engine_inputs)
            return p.postprocess(dict(zip(o, outputs, strict=True)), context)

        bare = lambda s=session, f=feed, o=names: s.run(o, f)  # noqa: E731
        provider = session.get_providers()[0]
        baselines[name] = Baseline(name, provider, pre, bare, pipeline, feed, (request, params))
    return baselines


def variant_calls(
    models: Path, baselines: dict[str, Baseline], options: dict[str, Any], device: str
) -> list[Any]:
    """Add this variant's in-process parts to each baseline, for the breakdown: ``engine_ms``
    (moesaic's ONNX Runtime engine with the variant's options on the pre-processed tensor) and
    ``node_pre_ms`` (the processor placed on the node's device, e.g. BEV encoded on the GPU)."""
    from moesaic.runtime.engine import create_engine
    from moesaic.runtime.processing import create_processor

    opened = []
    for name, base in baselines.items():
        spec = yaml.safe_load((models / name / "model.yaml").read_text())
        config = {**spec.get("engine", {}), **options}
        if device.startswith("cuda"):
            config["device_id"] = int(device.split(":")[1])
        else:
            config["providers"] = ["CPUExecutionProvider"]
        engine = create_engine(config, models / name)
        engine.load()
        proc = create_processor(spec["processor"], models / name)
        proc.inputs(engine.describe().inputs)
        proc.place(engine.describe().device)
        request, params = base.request
        base.calls["engine_ms"] = lambda e=engine, f=base.feed: e.infer(f)
        base.calls["node_pre_ms"] = lambda p=proc, r=request, q=params: p.preprocess(r, q)
        base.samples = {k: [] for k in base.calls}
        opened.append(engine)
        for call in base.calls.values():
            timed(call, 5, warmup=0)
    return opened


def attributed_j(metrics_port: int, model: str) -> float:
    """The node's attributed joules of ``model`` so far (its Prometheus counter)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    with urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == "moesaic_model_energy_joules_total" and s.labels.get("model") == model
    )


async def through_node(
    address: str,
    metrics_port: int,
    scan: np.ndarray,
    image: np.ndarray,
    baselines: dict[str, Baseline],
    n: int,
    seconds: float,
    nvml: Nvml,
    idle_w: float,
) -> dict[str, Any]:
    """(c), (d), (e): the real client against the running node. Latency: node calls interleaved
    with (a) and (b) in chunks of :data:`CHUNK`, so machine noise hits all alike; energy: then a
    loop of node calls alone, at least ``seconds`` long, over which the counters are read."""
    out: dict[str, Any] = {}
    async with NodeClient(address) as node:
        description = await node.describe(timeout=10)
        providers = {m.name: (m.device, m.provider, m.engine) for m in description.models}
        out["node_idle_watts"] = description.device.idle_watts
        for name in MODELS:
            inputs = {"image": image} if name == "yolo-n" else {"points": scan}
            params = {} if name == "yolo-n" else {"sensor_id": "bench"}
            for _ in range(30):
                result = await node.infer(name, inputs, parameters=params, timeout=30)
            rtt, compute = [], []
            base = baselines[name]
            while len(rtt) < n:
                base.run(CHUNK)
                for _ in range(CHUNK):
                    s = time.perf_counter()
                    result = await node.infer(name, inputs, parameters=params, timeout=30)
                    rtt.append((time.perf_counter() - s) * 1e3)
                    compute.append(result.compute_ms)
            energy: list[float] = []
            await asyncio.sleep(0.5)  # the meter closes the intervals of the phase before
            a0, count, e0, t0 = attributed_j(metrics_port, name), 0, nvml.mj(), time.monotonic()
            while count < n or time.monotonic() - t0 < seconds:
                result = await node.infer(name, inputs, parameters=params, timeout=30)
                energy.append(result.energy_mj)
                count += 1
            elapsed, de = time.monotonic() - t0, nvml.mj() - e0
            await asyncio.sleep(0.5)  # and those of the loop (idle after it adds ~0)
            attributed = attributed_j(metrics_port, name) - a0
            out[name] = {
                "device": providers[name][0],
                "provider": providers[name][1],
                "engine": providers[name][2],
                "rtt_ms": rtt,
                "compute_ms": compute,
                "node_energy_mj": energy,
                "energy_source": result.energy_source,
                "energy_requests": count,
                "energy_seconds": elapsed,
                "node_attributed_mj_per_inference": attributed * 1e3 / count,
                "nvml_total_mj_per_inference": de / count,
                "nvml_dynamic_mj_per_inference": (de - idle_w * elapsed * 1e3) / count,
                "outputs": {k: np.asarray(v) for k, v in result.outputs.items()},
            }
    return out


def same_outputs(name: str, node: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> bool:
    """The node answers what the in-process pipeline answers (GPU float tolerance)."""
    if name == "yolo-n":
        if len(node["boxes"]) != len(ref["boxes"]):
            return False
        return bool(np.allclose(node["boxes"], ref["boxes"], atol=0.5))
    return bool(np.allclose(node["probs"], ref["probs"], atol=1e-3))


def summarise(rows: list[dict[str, Any]], device: str) -> list[str]:
    lines = [
        f"device {device}; p50 in ms (p99 in brackets); ratios of p50s",
        "| model | variant | pre (in-process) | (a) bare session | (b) in-process pipeline "
        "| (c) node compute | (d) round trip | c/a | d/b | node mJ/inf (replies) "
        "| node mJ/inf (attributed over the loop) | NVML mJ/inf (dyn) | same output "
        "| engine alone | node's pre alone |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['pre_p50']:.3f} | {r['bare_p50']:.3f} | "
            f"{r['pipeline_p50']:.3f} | {r['compute_p50']:.3f} ({r['compute_p99']:.2f}) | "
            f"{r['rtt_p50']:.3f} ({r['rtt_p99']:.2f}) | {r['compute_p50'] / r['bare_p50']:.2f}x | "
            f"{r['rtt_p50'] / r['pipeline_p50']:.2f}x | {r['node_mj']:.2f} | {r['node_attributed_mj']:.2f} | "
            f"{r['nvml_dyn_mj']:.2f} | "
            f"{r['same']} | {r['engine_p50']:.3f} | {r['node_pre_p50']:.3f} |"
        )
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda:0", help="cuda:N or cpu")
    parser.add_argument("--models", type=Path, default=ROOT / "models")
    parser.add_argument("--data", type=Path, default=None, help="folder with kitti_000008.png/.bin")
    parser.add_argument("--requests", type=int, default=300, help="requests per model and node (at least)")
    parser.add_argument("--seconds", type=float, default=3.0, help="each loop runs at least this long")
    parser.add_argument("--variants", default="", help="comma-separated subset of plain,binding,graph")
    parser.add_argument("--out", type=Path, help="results JSON (default bench/results/gpu_node_DEVICE.json)")
    args = parser.parse_args()
    image, scan = load_fixtures(args.data or default_data())
    gpu = args.device.startswith("cuda")
    variants = dict(VARIANTS_GPU) if gpu else {"cpu": {}}
    if args.variants:
        variants = {k: v for k, v in variants.items() if k in args.variants.split(",")}
    nvml = Nvml(int(args.device.split(":")[1]) if gpu else None)

    baselines = in_process(args.models, image, scan, args.device)
    idle_w = nvml.idle_watts() if gpu else float("nan")
    rows: list[dict[str, Any]] = []
    raw: dict[str, Any] = {"in_process": {}, "nodes": {}}
    tmp = Path(tempfile.mkdtemp(prefix="gpu-node-"))
    (tmp / "logs").mkdir()
    try:
        for variant, engine in variants.items():
            repo = write_variant(args.models, tmp / variant, engine)
            port, metrics_port = free_port(), free_port()
            with ProcessTree(tmp / "logs") as tree:
                node = tree.spawn(
                    f"node-{variant}",
                    ["moesaic", "--log-level", "INFO", "node", "--models", str(repo), "--device", args.device,
                     "--listen", f"127.0.0.1:{port}", "--node-id", f"bench-{variant}",
                     "--metrics-port", str(metrics_port)],
                )  # fmt: skip
                try:
                    wait_grpc_ready(f"127.0.0.1:{port}", timeout=300, process=node)
                except (TimeoutError, RuntimeError):
                    print(tree.tail(tree.children[-1], 40), file=sys.stderr)
                    raise
                engines = variant_calls(args.models, baselines, engine, args.device)
                measured = asyncio.run(
                    through_node(
                        f"127.0.0.1:{port}",
                        metrics_port,
                        scan,
                        image,
                        baselines,
                        args.requests,
                        args.seconds,
                        nvml,
                        idle_w,
                    )
                )
                log_tail = tree.tail(tree.children[-1], 30)
                for closing in engines:
                    closing.close()
            raw["nodes"][variant] = {"log_tail": log_tail, "engine": engine}
            raw["nodes"][variant]["node_idle_watts"] = measured.pop("node_idle_watts")
            for name, m in measured.items():
                base = baselines[name]
                same = same_outputs(name, m.pop("outputs"), base.reference)
                raw["nodes"][variant][name] = m
                raw["in_process"].setdefault(variant, {})[name] = dict(base.samples)
                rows.append(
                    {
                        "model": name,
                        "variant": variant,
                        "provider": m["provider"],
                        "pre_p50": pct(base.samples["pre_ms"], 50),
                        "bare_p50": pct(base.samples["bare_ms"], 50),
                        "pipeline_p50": pct(base.samples["pipeline_ms"], 50),
                        "engine_p50": pct(base.samples["engine_ms"], 50),
                        "node_pre_p50": pct(base.samples["node_pre_ms"], 50),
                        "compute_p50": pct(m["compute_ms"], 50),
                        "compute_p99": pct(m["compute_ms"], 99),
                        "rtt_p50": pct(m["rtt_ms"], 50),
                        "rtt_p99": pct(m["rtt_ms"], 99),
                        "node_mj": statistics.fmean(m["node_energy_mj"]),
                        "node_attributed_mj": m["node_attributed_mj_per_inference"],
                        "nvml_dyn_mj": m["nvml_dynamic_mj_per_inference"],
                        "nvml_total_mj": m["nvml_total_mj_per_inference"],
                        "energy_source": m["energy_source"],
                        "same": same,
                    }
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    lines = summarise(rows, args.device)
    print("\n".join(lines))
    for name, base in baselines.items():
        what = "letterbox (cv2)" if name == "yolo-n" else "BEV encoding (numpy)"
        pre = base.samples["pre_ms"]
        print(f"{name}: {what} p50 {pct(pre, 50):.3f} ms, p99 {pct(pre, 99):.3f} ms; bare on {base.provider}")
    summary: dict[str, Any] = {
        "machine": machine() + (f", {nvml.name}" if nvml.name else ""),
        "device": args.device,
        "idle_watts_nvml": idle_w,
        "image": "kitti_000008.png (1242x375)",
        "scan": f"kitti_000008.bin ({len(scan)} points)",
        "rows": rows,
        "table": lines,
        "raw_ms": _rounded(raw),
    }
    name = f"gpu_node_{args.device.replace(':', '')}"
    print(f"machine: {summary['machine']}")
    print(f"raw results: {write_results(name, summary, out=args.out)}")
    return 0


def _rounded(value: Any) -> Any:
    """Samples kept, rounded to the microsecond, so the JSON stays readable in size."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    if isinstance(value, list):
        return [round(v, 4) if isinstance(v, float) else _rounded(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
