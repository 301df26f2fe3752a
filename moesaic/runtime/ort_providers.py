"""Which ONNX Runtime execution providers a session gets, and with which options.

- TensorRT only when its libraries load: :func:`tensorrt_problem` tries ``libnvinfer`` once per
  process (the ``tensorrt`` wheel's copy too) and says in one log line why the provider is
  skipped otherwise, instead of ONNX Runtime flooding the log with library errors on every
  session and then falling back. With TensorRT the engine cache (and timing cache) lives in the
  node's cache folder, one sub-folder per model file, and fp16 is on unless the model folder
  turns it off.
- CUDA: ``enable_cuda_graph`` when the model folder asks for CUDA graphs.
- CUDA's libraries are preloaded from the NVIDIA wheels (``onnxruntime.preload_dlls``) so that
  ``onnxruntime-gpu`` finds the same cuDNN and cuBLAS as torch.

The cache folder is ``$MOESAIC_CACHE_DIR``, else systemd's ``$CACHE_DIRECTORY``
(``CacheDirectory=moesaic`` in the unit), else ``$XDG_CACHE_HOME/moesaic`` (``~/.cache/moesaic``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

__all__ = [
    "CPU",
    "CUDA",
    "GPU_PROVIDERS",
    "TENSORRT",
    "cache_dir",
    "preload_cuda_libraries",
    "provider_options",
    "tensorrt_problem",
]

log = logging.getLogger(__name__)

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = frozenset({TENSORRT, CUDA})

_TENSORRT_LIBRARIES = ("libnvinfer.so.10", "libnvinfer_plugin.so.10", "libnvonnxparser.so.10")


def cache_dir(*parts: str) -> Path:
    """The node's cache folder (see the module docstring), joined with ``parts``; not created."""
    base = os.environ.get("MOESAIC_CACHE_DIR") or os.environ.get("CACHE_DIRECTORY", "").split(":")[0]
    if not base:
        base = str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "moesaic")
    return Path(base).joinpath(*parts)


def _tensorrt_wheel_dir() -> Path | None:
    """Folder of the libraries of the ``tensorrt`` wheel (``tensorrt_libs``), if installed."""
    try:
        spec = importlib.util.find_spec("tensorrt_libs")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


@functools.cache
def tensorrt_problem() -> str | None:
    """None when TensorRT's libraries load in this process, else why not (probed once, logged once)."""
    wheel = _tensorrt_wheel_dir()
    for name in _TENSORRT_LIBRARIES:
        candidates = [str(wheel / name)] if wheel is not None and (wheel / name).is_file() else []
        errors = []
        for candidate in [*candidates, name]:
            try:
                ctypes.CDLL(candidate, mode=ctypes.RTLD_GLOBAL)
                break
            except OSError as exc:
                errors.append(str(exc).split(":")[-1].strip() or type(exc).__name__)
        else:
            problem = (
                f"{name} does not load ({errors[-1]}); install TensorRT 10 "
                "(pip install 'moesaic[tensorrt]') to use ONNX Runtime's TensorRT execution provider"
            )
            log.info("TensorRT execution provider not used: %s", problem)
            return problem
    return None


@functools.cache
def preload_cuda_libraries() -> None:
    """Load CUDA and cuDNN from the NVIDIA wheels before the first CUDA session (once)."""
    import onnxruntime

    # Provider registration logs through the default logger (warnings such as "no registered
    # plugin EP device"); sessions log their own errors at severity 3 already.
    onnxruntime.set_default_logger_severity(3)
    preload = getattr(onnxruntime, "preload_dlls", None)
    if preload is None:
        return
    try:
        preload(cuda=True, cudnn=True, msvc=False)
    except Exception as exc:  # missing wheels: the session then reports what it cannot load
        log.debug("onnxruntime.preload_dlls: %s", exc)


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{path.parent.name}-{digest.hexdigest()[:16]}"


def provider_options(
    provider: str,
    *,
    device_id: int,
    model_file: Path,
    cuda_graph: bool,
    fp16: bool,
    tensorrt_cache: Path | None,
) -> dict[str, Any]:
    """Options of one provider for the model at ``model_file``; creates the TensorRT cache folder."""
    if provider == CUDA:
        options: dict[str, Any] = {"device_id": device_id}
        if cuda_graph:
            options["enable_cuda_graph"] = "1"
        return options
    if provider == TENSORRT:
        folder = (tensorrt_cache or cache_dir("onnxruntime-tensorrt")) / _file_key(model_file)
        folder.mkdir(parents=True, exist_ok=True)
        return {
            "device_id": device_id,
            "trt_fp16_enable": "True" if fp16 else "False",
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(folder),
            "trt_timing_cache_enable": "True",
            "trt_timing_cache_path": str(folder),
            "trt_cuda_graph_enable": "True" if cuda_graph else "False",
        }
    return {}
