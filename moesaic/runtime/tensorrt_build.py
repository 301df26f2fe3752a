"""Build TensorRT plans from ONNX for the GPU this runs on (``moesaic build-engine``).

Written against the TensorRT 10 Python API (OnnxParser, BuilderConfig memory pool limits,
FP16/INT8 flags, ``IInt8EntropyCalibrator2``, ``IProgressMonitor``); ``tensorrt`` is
imported lazily (extra ``tensorrt``). The parts that need no GPU (calibration data loading,
progress bookkeeping, shape ranges) are plain Python and tested everywhere.

Calibration data (``--int8 --calib DIR``): files sorted by name, each one batch —
``*.npz`` holding one array per network input name, or ``*.npy`` for single-input networks.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.runtime.engine import EngineError, MissingExtraError

__all__ = [
    "BuildProgress",
    "ShapeRange",
    "build_plan",
    "import_tensorrt",
    "load_calibration_batches",
]

log = logging.getLogger(__name__)

ShapeRange = tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]  # (min, opt, max)


def import_tensorrt() -> Any:
    """The ``tensorrt`` module, or :class:`MissingExtraError` naming the ``tensorrt`` extra."""
    try:
        import tensorrt
    except ImportError:
        raise MissingExtraError("tensorrt", "tensorrt") from None
    return tensorrt


def load_calibration_batches(
    calib_dir: Path | str, input_names: Sequence[str]
) -> list[dict[str, np.ndarray]]:
    """Calibration batches from ``calib_dir``; ``ValueError`` naming the file when one is unusable."""
    calib_dir = Path(calib_dir)
    if not calib_dir.is_dir():
        raise ValueError(f"--calib: {calib_dir} is not a directory")
    files = sorted(p for p in calib_dir.iterdir() if p.suffix in (".npy", ".npz"))
    if not files:
        raise ValueError(f"--calib: {calib_dir} holds no .npy or .npz files")
    names = list(input_names)
    batches: list[dict[str, np.ndarray]] = []
    for path in files:
        try:
            if path.suffix == ".npy":
                if len(names) != 1:
                    raise ValueError(
                        f"a .npy file fits single-input networks; this one takes {names}: use .npz"
                    )
                batch = {names[0]: np.load(path, allow_pickle=False)}
            else:
                with np.load(path, allow_pickle=False) as npz:
                    missing = [n for n in names if n not in npz.files]
                    if missing:
                        raise ValueError(f"missing arrays {missing} (has {npz.files})")
                    batch = {n: npz[n] for n in names}
        except (OSError, ValueError) as exc:
            raise ValueError(f"--calib: {path.name}: {exc}") from None
        for name, array in batch.items():
            if array.ndim == 0 or array.dtype.kind not in "fiub":
                raise ValueError(f"--calib: {path.name}: {name!r} must be a numeric array with a batch dim")
            if batches and array.shape != batches[0][name].shape:
                raise ValueError(
                    f"--calib: {path.name}: {name!r} has shape {list(array.shape)}, "
                    f"the first batch {list(batches[0][name].shape)}"
                )
            batch[name] = np.ascontiguousarray(array)
        batches.append(batch)
    return batches


class BuildProgress:
    """Bookkeeping behind TensorRT's ``IProgressMonitor``: phases, steps, one line per change.

    Thread-safe (TensorRT calls it from its builder threads). ``report`` receives lines like
    ``"Building engine > Tactic selection: 12/40"``; :attr:`line` holds the latest one.
    """

    def __init__(self, report: Callable[[str], None] | None = None) -> None:
        self._report = report
        self._lock = threading.Lock()
        self._phases: dict[str, tuple[str | None, int]] = {}
        self.line = "starting"
        self.cancelled = False

    def _path(self, phase: str) -> str:
        parts = [phase]
        parent = self._phases.get(phase, (None, 0))[0]
        while parent is not None and len(parts) < 8:
            parts.append(parent)
            parent = self._phases.get(parent, (None, 0))[0]
        return " > ".join(reversed(parts))

    def _emit(self, line: str) -> None:
        self.line = line
        if self._report is not None:
            self._report(line)

    def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
        with self._lock:
            self._phases[phase_name] = (parent_phase, num_steps)
            self._emit(f"{self._path(phase_name)}: 0/{num_steps}")

    def step_complete(self, phase_name: str, step: int) -> bool:
        with self._lock:
            total = self._phases.get(phase_name, (None, 0))[1]
            self._emit(f"{self._path(phase_name)}: {step + 1}/{total}")
            return not self.cancelled

    def phase_finish(self, phase_name: str) -> None:
        with self._lock:
            self._emit(f"{self._path(phase_name)}: done")
            self._phases.pop(phase_name, None)


def _monitor(trt: Any, progress: BuildProgress) -> Any:
    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            return progress.step_complete(phase_name, step)

        def phase_finish(self, phase_name: str) -> None:
            progress.phase_finish(phase_name)

    return _Monitor()


def _calibrator(trt: Any, batches: list[dict[str, np.ndarray]], cache: Path) -> Any:
    import torch  # device buffers for the calibration batches

    class _Calibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self) -> None:
            trt.IInt8EntropyCalibrator2.__init__(self)
            self._next = 0
            self._device: dict[str, Any] = {}

        def get_batch_size(self) -> int:
            return int(next(iter(batches[0].values())).shape[0])

        def get_batch(self, names: list[str]) -> list[int] | None:
            if self._next >= len(batches):
                return None
            batch = batches[self._next]
            self._next += 1
            self._device = {n: torch.from_numpy(batch[n]).cuda() for n in names}
            return [int(self._device[n].data_ptr()) for n in names]

        def read_calibration_cache(self) -> bytes | None:
            return cache.read_bytes() if cache.is_file() else None

        def write_calibration_cache(self, data: Any) -> None:
            cache.write_bytes(bytes(data))

    return _Calibrator()


def build_plan(
    onnx_path: Path | str,
    plan_path: Path | str,
    *,
    fp16: bool = False,
    int8: bool = False,
    calib_dir: Path | str | None = None,
    workspace_mb: int = 1024,
    shapes: Mapping[str, ShapeRange] | None = None,
    max_batch: int = 8,
    progress: BuildProgress | None = None,
) -> Path:
    """Parse ``onnx_path``, build a serialized plan for this GPU and write it to ``plan_path``.

    Dynamic inputs need an optimization profile: ``shapes[name] = (min, opt, max)``, or, when
    only the leading (batch) dim is dynamic, ``(1, 1, max_batch)`` batches by default.
    The plan is written atomically; returns its path.
    """
    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise ValueError(f"model: {onnx_path} not found")
    if int8 and calib_dir is None:
        raise ValueError("--int8 needs --calib DIR (calibration batches as .npy/.npz files)")
    if workspace_mb < 1:
        raise ValueError(f"--workspace: must be >= 1 MB, got {workspace_mb}")
    trt = import_tensorrt()
    progress = progress or BuildProgress(lambda line: log.info("build %s: %s", onnx_path.name, line))
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise EngineError(f"{onnx_path}: TensorRT cannot parse it: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_mb << 20)
    config.progress_monitor = monitor = _monitor(trt, progress)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)

    inputs = [network.get_input(i) for i in range(network.num_inputs)]
    profile = builder.create_optimization_profile()
    dynamic = False
    for tensor in inputs:
        dims = tuple(tensor.shape)
        if -1 not in dims:
            continue
        dynamic = True
        if shapes and tensor.name in shapes:
            lo, opt, hi = shapes[tensor.name]
        elif -1 not in dims[1:]:
            lo, opt, hi = ((1, *dims[1:]), (1, *dims[1:]), (max_batch, *dims[1:]))
        else:
            raise ValueError(
                f"input {tensor.name!r}: dynamic dims {list(dims)} need a (min, opt, max) shape range"
            )
        profile.set_shape(tensor.name, lo, opt, hi)
    if dynamic:
        config.add_optimization_profile(profile)

    calibrator = None
    if int8:
        assert calib_dir is not None
        batches = load_calibration_batches(calib_dir, [t.name for t in inputs])
        config.set_flag(trt.BuilderFlag.INT8)
        calibrator = _calibrator(trt, batches, plan_path.with_suffix(".calib"))
        config.int8_calibrator = calibrator
        if dynamic:
            config.set_calibration_profile(profile)

    serialized = builder.build_serialized_network(network, config)
    del monitor, calibrator
    if serialized is None:
        raise EngineError(f"{onnx_path}: TensorRT failed to build a plan (see the log above)")
    tmp = plan_path.with_name(plan_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(memoryview(serialized))
    tmp.replace(plan_path)
    return plan_path
