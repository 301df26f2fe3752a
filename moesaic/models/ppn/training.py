"""Training, evaluation and export of the PPN experts (``moesaic train ppn``).

Data: folders in the layout of :func:`moesaic.datasets.lidar_scenes.generate_sequence`
(one folder per sequence). The last ``val_sequences`` sequences are held out: a different
track, different cones and cars, never seen in training.

Targets:

* segmentation — the per-cell class map from the labelled points (:func:`bev_labels`);
* reconstruction — the dense obstacle map (:func:`dense_bev`): every wall, cone and car
  footprint, occluded parts included, i.e. what the sparse scan does not show.

Loss = task loss + ``edge_weight`` x edge loss, where the edge loss is the L1 distance between
the Sobel gradient magnitudes of the *prediction* (softmax / sigmoid) and of the target, so it
passes gradient to the network (the reference's edge term was computed on detached masks).
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from moesaic.datasets.lidar_scenes import CLASS_NAMES, LidarSequence, bev_labels
from moesaic.models.ppn.encoding import CPU_ENCODING, PpnEncoding
from moesaic.models.ppn.networks import Task, build_network, parameter_count

__all__ = [
    "BevSamples",
    "TrainConfig",
    "edge_loss",
    "evaluate",
    "export_onnx",
    "export_torch",
    "find_sequences",
    "load_samples",
    "one_cycle_lr",
    "rec_loss",
    "seg_loss",
    "sobel_magnitude",
    "train",
    "write_model_folder",
]

log = logging.getLogger(__name__)

TASK_NAMES = {"seg": "bev_segmentation", "rec": "bev_reconstruction"}


def find_sequences(folder: str | Path) -> list[Path]:
    """Sequence folders (holding ``velodyne/``) under ``folder``, sorted; ``folder`` itself if one."""
    root = Path(folder)
    if (root / "velodyne").is_dir():
        return [root]
    found = sorted(p for p in root.iterdir() if (p / "velodyne").is_dir()) if root.is_dir() else []
    if not found:
        raise ValueError(f"data: no sequence folders with velodyne/ under {root}")
    return found


class BevSamples:
    """Encoded frames of several sequences and their targets; sample i = T stacked frames."""

    def __init__(self, folders: Sequence[Path], encoding: PpnEncoding) -> None:
        self.encoding = encoding
        encoder = encoding.encoder()
        frames: list[np.ndarray] = []
        seg: list[np.ndarray] = []
        dense: list[np.ndarray] = []
        index: list[tuple[int, int]] = []
        for folder in folders:
            seq = LidarSequence(folder)
            start = len(frames)
            for i in range(len(seq)):
                points = seq.points(i)
                frames.append(encoder(points))
                seg.append(bev_labels(points, seq.labels(i), encoding.grid))
                dense.append(seq.dense(i, encoding.grid))
                index.append((start, start + i))
        self.frames = np.stack(frames)
        self.seg = np.stack(seg).astype(np.uint8)  # int64 per batch: 8x less memory
        self.dense = np.stack(dense)[:, None]
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def stack(self, i: int, window: tuple[slice, slice] | None = None) -> np.ndarray:
        """``(T*C, H, W)``: frames i-T+1 .. i of i's sequence, zeros before its start.

        ``window`` (rows, columns) cuts the grid first, so a training crop never copies whole grids.
        """
        start, cur = self.index[i]
        t = self.encoding.frames
        rows, cols = window or (slice(None), slice(None))
        first = max(start, cur - t + 1)
        frames = self.frames[first : cur + 1, :, rows, cols]
        out = np.zeros((t, *frames.shape[1:]), np.float32)
        out[t - len(frames) :] = frames
        return out.reshape(-1, *frames.shape[2:])

    def batch(
        self, ids: Sequence[int], rng: np.random.Generator | None = None, crop: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Inputs, segmentation and dense targets for ``ids``.

        With ``rng``: random flips and, when ``crop`` > 0, one random ``crop`` x ``crop`` window
        (the network is fully convolutional, so it still runs on the whole grid afterwards).
        """
        window = (slice(None), slice(None))
        if rng is not None and crop:
            h, w = self.frames.shape[-2:]
            r0 = int(rng.integers(0, max(1, h - crop + 1)))
            c0 = int(rng.integers(0, max(1, w - crop + 1)))
            window = (slice(r0, r0 + crop), slice(c0, c0 + crop))
        x = np.stack([self.stack(i, window) for i in ids])
        s = self.seg[list(ids)][:, window[0], window[1]].astype(np.int64)
        d = self.dense[list(ids)][..., window[0], window[1]]
        if rng is not None:
            for axis in (-2, -1):
                if rng.random() < 0.5:
                    x, s, d = np.flip(x, axis), np.flip(s, axis), np.flip(d, axis)
        return (
            torch.from_numpy(np.ascontiguousarray(x)),
            torch.from_numpy(np.ascontiguousarray(s)),
            torch.from_numpy(np.ascontiguousarray(d)),
        )


_SOBEL = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """Per-channel Sobel gradient magnitude of ``(B, C, H, W)``; differentiable."""
    c = x.shape[1]
    kx = _SOBEL.to(x)[None, None].repeat(c, 1, 1, 1)
    ky = _SOBEL.t().to(x)[None, None].repeat(c, 1, 1, 1)
    gx = F.conv2d(x, kx, padding=1, groups=c)
    gy = F.conv2d(x, ky, padding=1, groups=c)
    return torch.sqrt(gx * gx + gy * gy + 1e-6)


def edge_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between the Sobel magnitudes of a prediction (probabilities) and its target."""
    return F.l1_loss(sobel_magnitude(pred), sobel_magnitude(target))


def _dice(prob: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Soft Dice over the classes present in ``target`` (absent ones would only punish rare classes)."""
    inter = (prob * target).sum(dim=(0, 2, 3))
    mass = target.sum(dim=(0, 2, 3))
    score = (2 * inter + 1) / (prob.sum(dim=(0, 2, 3)) + mass + 1)
    present = (mass > 0).to(score)
    return 1 - (score * present).sum() / present.sum().clamp(min=1.0)


def seg_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    class_weights: torch.Tensor | None = None,
    edge_weight: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted cross-entropy + soft Dice + edge term on the softmax; (total, parts)."""
    prob = logits.softmax(1)
    onehot = F.one_hot(target, logits.shape[1]).permute(0, 3, 1, 2).to(prob)
    ce = F.cross_entropy(logits, target, weight=class_weights)
    dice = _dice(prob, onehot)
    edge = edge_loss(prob, onehot)
    total = ce + dice + edge_weight * edge
    return total, {"ce": ce.item(), "dice": dice.item(), "edge": edge.item()}


def rec_loss(
    logits: torch.Tensor, target: torch.Tensor, *, pos_weight: float = 4.0, edge_weight: float = 0.5
) -> tuple[torch.Tensor, dict[str, float]]:
    """BCE + soft Dice + edge term on the sigmoid; (total, parts)."""
    prob = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=torch.tensor(pos_weight).to(logits))
    dice = _dice(prob, target)
    edge = edge_loss(prob, target)
    total = bce + dice + edge_weight * edge
    return total, {"bce": bce.item(), "dice": dice.item(), "edge": edge.item()}


class _Baseline(nn.Module):
    """The constant answer a network must beat: all ``empty`` (seg) or an all-zero map (rec)."""

    def __init__(self, task: Task) -> None:
        super().__init__()
        self.task = task

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if self.task == "rec":
            return torch.full((b, 1, h, w), -20.0, device=x.device)  # sigmoid ~ 0
        out = torch.zeros((b, len(CLASS_NAMES), h, w), device=x.device)
        out[:, 0] = 1.0  # class 0, empty
        return out


@torch.no_grad()
def evaluate(
    model: nn.Module | None, task: Task, samples: BevSamples, *, batch: int = 4, device: str | None = None
) -> dict[str, float]:
    """Held-out metrics: ``miou`` (+ per-class IoU) for seg; ``mae``, ``iou``, ``f1`` for rec.

    ``model=None`` scores the baseline (all ``empty`` / all zeros). Runs on ``device`` (default:
    where the model's parameters are), whole grids, ``batch`` frames at a time.
    """
    if model is None:
        model = _Baseline(task)
    params = list(model.parameters())
    dev = torch.device(device) if device else (params[0].device if params else torch.device("cpu"))
    model.eval()
    classes = len(CLASS_NAMES)
    inter = np.zeros(classes)
    union = np.zeros(classes)
    abs_err = tp = fp = fn = 0.0
    cells = 0
    for lo in range(0, len(samples), batch):
        x, s, d = samples.batch(range(lo, min(lo + batch, len(samples))))
        out = model(x.to(dev)).float()
        if task == "seg":
            pred = out.argmax(1).cpu().numpy()
            truth = s.numpy()
            for c in range(classes):
                inter[c] += np.sum((pred == c) & (truth == c))
                union[c] += np.sum((pred == c) | (truth == c))
        else:
            prob = torch.sigmoid(out).cpu().numpy()
            truth = d.numpy()
            abs_err += float(np.abs(prob - truth).sum())
            cells += truth.size
            hit = prob >= 0.5
            tp += float(np.sum(hit & (truth > 0.5)))
            fp += float(np.sum(hit & (truth <= 0.5)))
            fn += float(np.sum(~hit & (truth > 0.5)))
    if task == "seg":
        present = union > 0
        iou = np.where(present, inter / np.maximum(union, 1), np.nan)
        metrics = {"miou": float(np.nanmean(iou))}
        metrics |= {f"iou_{name}": float(v) for name, v in zip(CLASS_NAMES, iou, strict=True)}
        return metrics
    return {
        "mae": abs_err / max(cells, 1),
        "iou": tp / max(tp + fp + fn, 1.0),
        "f1": 2 * tp / max(2 * tp + fp + fn, 1.0),
    }


_PACE_FROM, _PACE_STEPS = 10, 20  # steps timed (after the first 10) to fit the schedule into max_seconds


def one_cycle_lr(step: int, total: int, max_lr: float, *, warm: float = 0.15) -> float:
    """One-cycle learning rate: cosine from max/25 up to max over ``warm``, then down to max/1e4."""
    up = max(1, int(warm * total))
    if step < up:
        lo, hi, frac = max_lr / 25, max_lr, step / up
    else:
        lo, hi, frac = max_lr, max_lr / 1e4, (step - up) / max(1, total - up)
    return hi + (lo - hi) * (1 + math.cos(math.pi * min(frac, 1.0))) / 2


@dataclass
class TrainConfig:
    """Options of ``moesaic train ppn``."""

    data: Path
    task: Task = "seg"
    size: str = "small"
    encoding: PpnEncoding = field(default_factory=lambda: CPU_ENCODING)
    steps: int = 300
    batch: int = 4
    crop: int = 128
    lr: float = 2e-3
    edge_weight: float = 0.5
    val_sequences: int = 1
    seed: int = 0
    device: str = "cpu"
    threads: int = 1
    max_seconds: float = 0.0  # > 0: fewer steps when the first ones show ``steps`` would not fit


@dataclass
class TrainResult:
    model: nn.Module
    metrics: dict[str, float]
    history: list[float]
    seconds: float
    parameters: int
    train_frames: int
    val_frames: int
    baseline: dict[str, float] = field(default_factory=dict)
    steps_done: int = 0


def _class_weights(seg: np.ndarray) -> torch.Tensor:
    freq = np.bincount(seg.ravel(), minlength=len(CLASS_NAMES)).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(freq / freq.sum(), 1e-4))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def load_samples(config: TrainConfig) -> tuple[BevSamples, BevSamples]:
    """The training and held-out samples of ``config.data`` (the last ``val_sequences`` held out)."""
    folders = find_sequences(config.data)
    if len(folders) <= config.val_sequences:
        raise ValueError(
            f"data: {len(folders)} sequences under {config.data}, "
            f"need more than val_sequences={config.val_sequences}"
        )
    train_set = BevSamples(folders[: len(folders) - config.val_sequences], config.encoding)
    val_set = BevSamples(folders[len(folders) - config.val_sequences :], config.encoding)
    return train_set, val_set


def train(
    config: TrainConfig,
    progress: Callable[[int, int, float], None] | None = None,
    *,
    samples: tuple[BevSamples, BevSamples] | None = None,
) -> TrainResult:
    """Train one expert and evaluate it (and the baseline) on the held-out sequences.

    ``samples``: the (training, held-out) sets from :func:`load_samples`, to encode them once
    for both experts.
    """
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    train_set, val_set = samples or load_samples(config)
    device = torch.device(config.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop shapes: let cuDNN pick its kernels
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    model = build_network(config.task, config.size, config.encoding.in_channels, len(CLASS_NAMES)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    weights = _class_weights(train_set.seg).to(device)
    rng = np.random.default_rng(config.seed)
    history: list[float] = []
    total = config.steps
    start = time.perf_counter()
    step = 0
    paced = start
    while step < total:
        for group in opt.param_groups:
            group["lr"] = one_cycle_lr(step, total, config.lr)
        model.train()
        ids = rng.integers(0, len(train_set), config.batch).tolist()
        x, s, d = (t.to(device, non_blocking=True) for t in train_set.batch(ids, rng, config.crop))
        logits = model(x)
        if config.task == "seg":
            loss, _ = seg_loss(logits, s, class_weights=weights, edge_weight=config.edge_weight)
        else:
            loss, _ = rec_loss(logits, d, edge_weight=config.edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        step += 1
        if step == _PACE_FROM:
            paced = time.perf_counter()
        if config.max_seconds and step == _PACE_FROM + _PACE_STEPS:
            # Fit the schedule into max_seconds at the pace of steps 10..30 (past the warm-up:
            # cuDNN's autotuning, lazy CUDA init), rather than cutting a schedule off half-way.
            now = time.perf_counter()
            per_step = (now - paced) / _PACE_STEPS
            fits = step + max(0, int((config.max_seconds - (now - start)) / per_step))
            if fits < total:
                log.warning(
                    "%s: %d of %d steps fit in max_seconds=%s", config.task, fits, total, config.max_seconds
                )
                total = max(fits, step)
        if progress:
            progress(step, total, float(loss.detach()))
    seconds = time.perf_counter() - start
    metrics = evaluate(model, config.task, val_set)  # on the training device: whole grids
    baseline = evaluate(None, config.task, val_set)
    model.cpu()
    return TrainResult(
        model,
        metrics,
        history,
        seconds,
        parameter_count(model),
        len(train_set),
        len(val_set),
        baseline,
        len(history),
    )


class _Serving(nn.Module):
    """The network plus its output activation: softmax probabilities or sigmoid map."""

    def __init__(self, net: nn.Module, task: Task) -> None:
        super().__init__()
        self.net = net
        self.task = task

    def forward(self, bev: torch.Tensor) -> torch.Tensor:
        out = self.net(bev)
        return out.softmax(1) if self.task == "seg" else torch.sigmoid(out)


def export_onnx(model: nn.Module, task: Task, encoding: PpnEncoding, path: str | Path) -> None:
    """Export to ONNX: input ``bev`` [1, T*C, H, W] -> ``probs`` [1, C, H, W] or ``bev_out`` [1, 1, H, W]."""
    wrapper = _Serving(model, task).eval()
    h, w = encoding.shape
    example = torch.zeros(1, encoding.in_channels, h, w)
    output = "probs" if task == "seg" else "bev_out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)  # the pad/crop branch is static per grid
        torch.onnx.export(
            wrapper,
            (example,),
            str(path),
            input_names=["bev"],
            output_names=[output],
            opset_version=17,
            dynamo=False,
        )


def export_torch(model: nn.Module, task: Task, encoding: PpnEncoding, path: str | Path) -> None:
    """``torch.export`` program (``.pt2``) for the torch engine, I/O as :func:`export_onnx`.

    The I/O description is embedded as ``moesaic.json`` (what
    :func:`moesaic.runtime.torch_engine.save_torch_model` writes, without importing the runtime),
    so the engine captures a CUDA graph for the one static input shape.
    """
    wrapper = _Serving(model, task).eval()
    h, w = encoding.shape
    example = torch.zeros(1, encoding.in_channels, h, w)
    output = "probs" if task == "seg" else "bev_out"
    out_channels = len(CLASS_NAMES) if task == "seg" else 1
    meta = {
        "inputs": [{"name": "bev", "datatype": "FP32", "shape": [1, encoding.in_channels, h, w]}],
        "outputs": [{"name": output, "datatype": "FP32", "shape": [1, out_channels, h, w]}],
    }
    with torch.no_grad():
        program = torch.export.export(wrapper, (example,))
    program._example_inputs = None  # else the 1 x T*C x H x W example is saved too (64 MB at 1024²)
    torch.export.save(program, str(path), extra_files={"moesaic.json": json.dumps(meta)})


def write_model_folder(
    folder: str | Path,
    result: TrainResult,
    config: TrainConfig,
    *,
    command: str = "",
    engine: Literal["onnxruntime", "torch"] = "onnxruntime",
) -> Path:
    """A model folder a node serves: ``model.yaml`` + ``model.onnx`` or ``model.pt2`` (+ ``weights.pt``).

    ``engine: torch`` writes a ``torch.export`` program for the PyTorch engine (CUDA graphs on);
    no ``engine.device`` is written, so the node's ``--device`` decides where it runs.
    """
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    engine_spec: dict[str, Any]
    if engine == "torch":
        export_torch(result.model, config.task, config.encoding, out / "model.pt2")
        engine_spec = {"type": "torch", "cuda_graphs": True}
    else:
        export_onnx(result.model, config.task, config.encoding, out / "model.onnx")
        engine_spec = {"type": "onnxruntime", **({"intra_op_threads": 1} if config.size == "small" else {})}
    torch.save(result.model.state_dict(), out / "weights.pt")
    spec: dict[str, Any] = {
        "name": out.name,
        "task": TASK_NAMES[config.task],
        "description": (
            f"PPN {'segmentation U-Net' if config.task == 'seg' else 'reconstruction encoder-decoder'} "
            f"({config.size}, {result.parameters:,} parameters) on {config.encoding.mode} BEV, "
            f"T={config.encoding.frames}, {config.encoding.grid.resolution} m cells"
        ),
        "engine": engine_spec,
        "processor": {"type": "ppn_bev", "task": config.task, **config.encoding.to_options()},
    }
    if config.task == "seg":
        spec["class_names"] = list(CLASS_NAMES)
    (out / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    report = {
        "metrics": {k: round(v, 4) for k, v in result.metrics.items() if not math.isnan(v)},
        "baseline": {k: round(v, 4) for k, v in result.baseline.items() if not math.isnan(v)},
        "train_seconds": round(result.seconds, 1),
        "steps": result.steps_done or config.steps,
        "train_frames": result.train_frames,
        "val_frames": result.val_frames,
        "final_loss": round(float(np.mean(result.history[-20:])), 4),
        "command": command,
        "config": {k: str(v) for k, v in asdict(config).items() if k != "encoding"},
    }
    (out / "training.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    return out
