"""The gate: per task, cheap request features -> weights over ALL experts of the task.

A multinomial logistic regression (softmax over experts) in numpy, trained **once** on the
full expert set by minimising the validation table's mixture cross-entropy

    mean_r -log sum_n g_n(x_frame(r)) q_rn

with L2 regularisation. For a subset S the coordinator renormalises the weights over S
(:meth:`Gate.weights_over`); the gate is never retrained per subset (optimality preservation).

>>> gate = Gate.uniform("classification", ["a/m", "b/m"], "tensor")
>>> gate.weights_over(np.zeros(12), ["b/m"]).tolist()
[1.0]
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moesaic.coordinator.features import FEATURE_NAMES
from moesaic.coordinator.validation import ValidationTable

__all__ = ["Gate", "mixture_loss", "train_gate"]

_FORMAT = "moesaic-gate/1"


@dataclass(frozen=True)
class Gate:
    task: str
    experts: tuple[str, ...]
    input_kind: str
    mean: np.ndarray
    """[F] feature standardisation."""
    scale: np.ndarray
    weights: np.ndarray
    """[F, N] logistic-regression weights."""
    bias: np.ndarray
    """[N]."""

    def __post_init__(self) -> None:
        n = len(self.experts)
        f = len(FEATURE_NAMES[self.input_kind]) if self.input_kind in FEATURE_NAMES else np.size(self.mean)
        for name, arr, shape in (
            ("mean", self.mean, (f,)),
            ("scale", self.scale, (f,)),
            ("weights", self.weights, (f, n)),
            ("bias", self.bias, (n,)),
        ):
            a = np.asarray(arr, np.float64)
            if a.shape != shape or not np.all(np.isfinite(a)):
                raise ValueError(
                    f"gate: {name}: expected finite values of shape {list(shape)}, got {list(a.shape)}"
                )
            object.__setattr__(self, name, a)
        object.__setattr__(self, "experts", tuple(self.experts))

    @classmethod
    def uniform(
        cls, task: str, experts: Sequence[str], input_kind: str, prior: Sequence[float] | None = None
    ) -> Gate:
        """A gate that ignores the input: weights proportional to ``prior`` (default equal)."""
        f, n = len(FEATURE_NAMES[input_kind]), len(experts)
        p = np.ones(n) if prior is None else np.maximum(np.asarray(prior, np.float64), 1e-9)
        return cls(task, tuple(experts), input_kind, np.zeros(f), np.ones(f), np.zeros((f, n)), np.log(p))

    def logits(self, features: np.ndarray) -> np.ndarray:
        x = (np.asarray(features, np.float64) - self.mean) / self.scale
        return np.asarray(x @ self.weights + self.bias)

    def weights_all(self, features: np.ndarray) -> np.ndarray:
        """Softmax weights over all experts: [N] for one feature vector, [M, N] for a batch."""
        z = self.logits(features)
        z = z - z.max(axis=-1, keepdims=True)
        e = np.exp(z)
        return np.asarray(e / e.sum(axis=-1, keepdims=True))

    def weights_over(self, features: np.ndarray, experts: Sequence[str]) -> np.ndarray:
        """Weights renormalised over ``experts`` (a subset of the gate's experts)."""
        index = {e: i for i, e in enumerate(self.experts)}
        missing = [e for e in experts if e not in index]
        if missing:
            raise LookupError(f"gate of {self.task!r} has no expert {missing[0]!r}")
        g = self.weights_all(features)[[index[e] for e in experts]]
        total = g.sum()
        return np.asarray(g / total) if total > 0 else np.full(len(experts), 1.0 / len(experts))

    def save(self, path: Path) -> None:
        doc = {
            "format": _FORMAT,
            "task": self.task,
            "experts": list(self.experts),
            "input_kind": self.input_kind,
            "feature_names": list(FEATURE_NAMES.get(self.input_kind, ())),
            "mean": self.mean.tolist(),
            "scale": self.scale.tolist(),
            "weights": self.weights.tolist(),
            "bias": self.bias.tolist(),
        }
        path.write_text(json.dumps(doc, indent=1))

    @classmethod
    def load(cls, path: Path) -> Gate:
        try:
            doc = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: cannot read gate: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != _FORMAT:
            raise ValueError(f"{path}: format: expected {_FORMAT!r} (a file written by `moesaic train-gate`)")
        try:
            return cls(
                task=str(doc["task"]),
                experts=tuple(doc["experts"]),
                input_kind=str(doc["input_kind"]),
                mean=np.asarray(doc["mean"]),
                scale=np.asarray(doc["scale"]),
                weights=np.asarray(doc["weights"]),
                bias=np.asarray(doc["bias"]),
            )
        except KeyError as exc:
            raise ValueError(f"{path}: {exc.args[0]}: missing") from None
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None


def train_gate(
    table: ValidationTable, *, l2: float = 1e-3, steps: int = 500, lr: float = 0.05, seed: int = 0
) -> Gate:
    """Fit the gate on the full expert set by full-batch Adam on the mixture cross-entropy."""
    del seed  # deterministic: zero initialisation
    known = FEATURE_NAMES.get(table.input_kind)
    if known is not None and tuple(table.feature_names) != known:
        raise ValueError(
            f"validation table: feature_names {list(table.feature_names)} do not match the "
            f"{table.input_kind!r} features {list(known)}"
        )
    x = table.features
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale[scale < 1e-9] = 1.0
    xs = (x - mean) / scale
    f, n = xs.shape[1], len(table.experts)
    q = np.maximum(table.q, 1e-12)
    # Start from the experts' mean log-likelihood ranking, so an uninformative feature set still
    # weights better experts higher.
    params = np.zeros((f + 1, n))
    params[f] = np.log(q).mean(axis=0)
    params[f] -= params[f].max()
    m_t = np.zeros_like(params)
    v_t = np.zeros_like(params)
    xb = np.hstack([xs, np.ones((len(xs), 1))])
    rows = len(table.frame)
    for t in range(1, steps + 1):
        z = xb @ params  # [Fr, N]
        z -= z.max(axis=1, keepdims=True)
        g = np.exp(z)
        g /= g.sum(axis=1, keepdims=True)
        gr = g[table.frame]  # [R, N]
        mix = (gr * q).sum(axis=1, keepdims=True)
        # d(-log mix)/dz_n = g_n - g_n q_n / mix  (per row), summed into its frame.
        dz_rows = gr - gr * q / mix
        dz = np.zeros_like(g)
        np.add.at(dz, table.frame, dz_rows)
        grad = xb.T @ dz / rows
        grad[:f] += l2 * params[:f]
        m_t = 0.9 * m_t + 0.1 * grad
        v_t = 0.999 * v_t + 0.001 * grad**2
        params -= lr * (m_t / (1 - 0.9**t)) / (np.sqrt(v_t / (1 - 0.999**t)) + 1e-8)
    return Gate(table.task, table.experts, table.input_kind, mean, scale, params[:f], params[f])


def mixture_loss(gate: Gate, table: ValidationTable, experts: Sequence[str] | None = None) -> float:
    """The table's mixture cross-entropy with ``gate`` renormalised over ``experts`` (default all)."""
    cols = table.columns(list(experts) if experts is not None else list(table.experts))
    g = gate.weights_all(table.features)[table.frame][:, cols]
    mix = (g * table.q[:, cols]).sum(axis=1) / g.sum(axis=1)
    return float(-np.log(np.maximum(mix, 1e-12)).mean())
