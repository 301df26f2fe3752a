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

import logging
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

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
    "find_sequences",
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
        self.seg = np.stack(seg).astype(np.int64)
        self.dense = np.stack(dense)[:, None]
        self.index = index

    def __len__(self) -> int:
        return len(self.index)

    def stack(self, i: int) -> np.ndarray:
        """``(T*C, H, W)``: frames i-T+1 .. i of i's sequence, zeros before its start."""
        start, cur = self.index[i]
        t = self.encoding.frames
        out = np.zeros((t, *self.frames.shape[1:]), np.float32)
        first = max(start, cur - t + 1)
        out[t - (cur - first + 1) :] = self.frames[first : cur + 1]
        return out.reshape(-1, *self.frames.shape[2:])

    def batch(
        self, ids: Sequence[int], rng: np.random.Generator | None = None, crop: int = 0
    ) -> tuple[torch.Tensor, ...]:
        """Inputs, segmentation and dense targets for ``ids``.

        With ``rng``: random flips and, when ``crop`` > 0, one random ``crop`` x ``crop`` window
        (the network is fully convolutional, so it still runs on the whole grid afterwards).
        """
        x = np.stack([self.stack(i) for i in ids])
        s = self.seg[list(ids)]
        d = self.dense[list(ids)]
        if rng is not None and crop:
            h, w = x.shape[-2:]
            r0 = int(rng.integers(0, max(1, h - crop + 1)))
            c0 = int(rng.integers(0, max(1, w - crop + 1)))
            x, s, d = (a[..., r0 : r0 + crop, c0 : c0 + crop] for a in (x, s, d))
        if rng is not None:
            for axis in (-2, -1):
                if rng.random() < 0.5:
                    x, s, d = np.flip(x, axis), np.flip(s, axis), np.flip(d, axis)
        return (torch.from_numpy(x.copy()), torch.from_numpy(s.copy()), torch.from_numpy(d.copy()))


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


@torch.no_grad()
def evaluate(model: nn.Module, task: Task, samples: BevSamples, *, batch: int = 4) -> dict[str, float]:
    """Held-out metrics: ``miou`` (+ per-class IoU) for seg; ``mae``, ``iou``, ``f1`` for rec."""
    model.eval()
    classes = len(CLASS_NAMES)
    inter = np.zeros(classes)
    union = np.zeros(classes)
    abs_err = tp = fp = fn = 0.0
    cells = 0
    for lo in range(0, len(samples), batch):
        x, s, d = samples.batch(range(lo, min(lo + batch, len(samples))))
        out = model(x)
        if task == "seg":
            pred = out.argmax(1).numpy()
            truth = s.numpy()
            for c in range(classes):
                inter[c] += np.sum((pred == c) & (truth == c))
                union[c] += np.sum((pred == c) | (truth == c))
        else:
            prob = torch.sigmoid(out).numpy()
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


@dataclass
class TrainResult:
    model: nn.Module
    metrics: dict[str, float]
    history: list[float]
    seconds: float
    parameters: int
    train_frames: int
    val_frames: int


def _class_weights(seg: np.ndarray) -> torch.Tensor:
    freq = np.bincount(seg.ravel(), minlength=len(CLASS_NAMES)).astype(np.float64)
    weights = 1.0 / np.sqrt(np.maximum(freq / freq.sum(), 1e-4))
    return torch.tensor(weights / weights.mean(), dtype=torch.float32)


def train(config: TrainConfig, progress: Callable[[int, int, float], None] | None = None) -> TrainResult:
    """Train one expert and evaluate it on the held-out sequences."""
    torch.manual_seed(config.seed)
    if config.threads:
        torch.set_num_threads(config.threads)
    folders = find_sequences(config.data)
    if len(folders) <= config.val_sequences:
        raise ValueError(
            f"data: {len(folders)} sequences under {config.data}, "
            f"need more than val_sequences={config.val_sequences}"
        )
    train_set = BevSamples(folders[: len(folders) - config.val_sequences], config.encoding)
    val_set = BevSamples(folders[len(folders) - config.val_sequences :], config.encoding)
    device = torch.device(config.device)
    model = build_network(config.task, config.size, config.encoding.in_channels, len(CLASS_NAMES)).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=config.lr, total_steps=config.steps, pct_start=0.15
    )
    weights = _class_weights(train_set.seg).to(device)
    rng = np.random.default_rng(config.seed)
    history: list[float] = []
    start = time.perf_counter()
    for step in range(config.steps):
        model.train()
        ids = rng.integers(0, len(train_set), config.batch).tolist()
        x, s, d = (t.to(device) for t in train_set.batch(ids, rng, config.crop))
        logits = model(x)
        if config.task == "seg":
            loss, _ = seg_loss(logits, s, class_weights=weights, edge_weight=config.edge_weight)
        else:
            loss, _ = rec_loss(logits, d, edge_weight=config.edge_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if progress:
            progress(step + 1, config.steps, float(loss))
    seconds = time.perf_counter() - start
    model.cpu()
    metrics = evaluate(model, config.task, val_set)
    return TrainResult(model, metrics, history, seconds, parameter_count(model), len(train_set), len(val_set))


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


def write_model_folder(
    folder: str | Path, result: TrainResult, config: TrainConfig, *, command: str = ""
) -> Path:
    """``model.onnx`` + ``model.yaml`` (+ ``weights.pt``) for a node to serve."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    export_onnx(result.model, config.task, config.encoding, out / "model.onnx")
    torch.save(result.model.state_dict(), out / "weights.pt")
    spec: dict[str, Any] = {
        "name": out.name,
        "task": TASK_NAMES[config.task],
        "description": (
            f"PPN {'segmentation U-Net' if config.task == 'seg' else 'reconstruction encoder-decoder'} "
            f"({config.size}, {result.parameters:,} parameters) on {config.encoding.mode} BEV, "
            f"T={config.encoding.frames}, {config.encoding.grid.resolution} m cells"
        ),
        "engine": {"type": "onnxruntime", **({"intra_op_threads": 1} if config.size == "small" else {})},
        "processor": {"type": "ppn_bev", "task": config.task, **config.encoding.to_options()},
    }
    if config.task == "seg":
        spec["class_names"] = list(CLASS_NAMES)
    (out / "model.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    report = {
        "metrics": {k: round(v, 4) for k, v in result.metrics.items() if not math.isnan(v)},
        "train_seconds": round(result.seconds, 1),
        "steps": config.steps,
        "train_frames": result.train_frames,
        "val_frames": result.val_frames,
        "final_loss": round(float(np.mean(result.history[-20:])), 4),
        "command": command,
        "config": {k: str(v) for k, v in asdict(config).items() if k != "encoding"},
    }
    (out / "training.yaml").write_text(yaml.safe_dump(report, sort_keys=False))
    return out
