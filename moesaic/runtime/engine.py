"""The one Engine contract every backend implements, and the backend registry.

An engine runs one model on one device. Its lifecycle is explicit::

    engine = create_engine({"type": "onnxruntime"}, model_dir=Path("models/toy"))
    engine.load()                  # loads weights and warms up: the first request is not slow
    outputs = engine.infer({"x": np.zeros((1, 3), np.float32)})
    engine.close()

Backends live in one module each, declare a pydantic config with a ``type`` literal and
register themselves with :func:`register_engine`. Heavy imports (onnxruntime, torch,
tensorrt) happen inside the backend, lazily; a missing package raises
:class:`MissingExtraError` naming the extra to install.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from moesaic.errors import Internal

__all__ = [
    "DATATYPES",
    "Engine",
    "EngineConfig",
    "EngineDescription",
    "EngineError",
    "MissingExtraError",
    "TensorSpec",
    "create_engine",
    "datatype_of",
    "dtype_of",
    "engine_types",
    "register_engine",
]

# KServe v2 datatype name -> numpy dtype (little-endian). BYTES is an object array of bytes.
DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
_NAMES = {dt: name for name, dt in DATATYPES.items() if name != "BYTES"}


def dtype_of(datatype: str) -> np.dtype[Any]:
    """numpy dtype of a KServe datatype name; ``ValueError`` naming it when unknown."""
    try:
        return DATATYPES[datatype]
    except KeyError:
        raise ValueError(f"unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}") from None


def datatype_of(dtype: np.dtype[Any] | type) -> str:
    """KServe datatype name of a numpy dtype (object arrays are BYTES)."""
    dt = np.dtype(dtype)
    if dt.kind in "OSU":
        return "BYTES"
    try:
        return _NAMES[dt.newbyteorder("<") if dt.byteorder == ">" else dt]
    except KeyError:
        raise ValueError(f"numpy dtype {dt} has no KServe datatype") from None


@dataclass(frozen=True)
class TensorSpec:
    """Name, KServe datatype and shape of one model input or output (-1 = dynamic).

    ``encoded``: an input that may also come as ``BYTES [1]``, one encoded image (JPEG or PNG)
    the processor decodes, so that a camera frame need not cross the wire decoded.
    """

    name: str
    datatype: str
    shape: tuple[int, ...]
    encoded: bool = False

    def __post_init__(self) -> None:
        dtype_of(self.datatype)
        if any(d < -1 for d in self.shape):
            raise ValueError(f"tensor {self.name!r}: dimensions must be >= -1, got {self.shape}")

    def accepts_shape(self, shape: tuple[int, ...]) -> bool:
        """True when ``shape`` fits this spec (same rank, fixed dims equal)."""
        return len(shape) == len(self.shape) and all(
            w in (-1, s) for w, s in zip(self.shape, shape, strict=True)
        )


@dataclass(frozen=True)
class EngineDescription:
    """What an engine reports about itself once loaded."""

    backend: str
    device: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    details: dict[str, str] = field(default_factory=dict)


class EngineError(Internal, RuntimeError):
    """An engine failed to load or to run (INTERNAL; its message names the engine)."""

    default_reason = "engine_failed"


class MissingExtraError(EngineError, ImportError):
    """A backend's package is not installed; the message names the extra to install."""

    def __init__(self, package: str, extra: str, *alternatives: str) -> None:
        how = " or ".join(f"pip install 'moesaic[{e}]'" for e in (extra, *alternatives))
        super().__init__(f"{package} is not installed; install it with: {how}")
        self.package = package
        self.extra = extra


class EngineConfig(BaseModel):
    """Base of every backend's config; subclasses add ``type: Literal[...]`` and options."""

    model_config = ConfigDict(extra="forbid")
    type: str


class Engine(ABC):
    """One model on one device. Subclasses must implement every abstract method."""

    backend: ClassVar[str]

    @abstractmethod
    def load(self) -> None:
        """Load the model and warm it up; afterwards :attr:`ready` is True."""

    @property
    @abstractmethod
    def ready(self) -> bool:
        """True between a successful :meth:`load` and :meth:`close`."""

    @abstractmethod
    def infer(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one (possibly batched) inference; raises :class:`EngineError` on failure."""

    @abstractmethod
    def describe(self) -> EngineDescription:
        """Inputs, outputs and device; valid after :meth:`load`."""

    @abstractmethod
    def close(self) -> None:
        """Release the model and its device memory. Idempotent."""

    def __enter__(self) -> Engine:
        self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


EngineFactory = Callable[[Any, Path], Engine]
_REGISTRY: dict[str, tuple[type[EngineConfig], EngineFactory]] = {}

# Backend modules, imported on first use. Each one calls register_engine at import; none
# imports its heavy framework at module level.
_BACKEND_MODULES = (
    "moesaic.runtime.onnxruntime_engine",
    "moesaic.runtime.torch_engine",
    "moesaic.runtime.tensorrt_engine",
    "moesaic.models.detector.engine",
    "moesaic.models.florence2.engine",
)


def register_engine(config_cls: type[EngineConfig], factory: EngineFactory) -> None:
    """Register a backend under the ``type`` literal of its config class."""
    type_name = config_cls.model_fields["type"].default
    if not isinstance(type_name, str):
        raise TypeError(f"{config_cls.__name__}.type needs a string default")
    _REGISTRY[type_name] = (config_cls, factory)


def _load_backends() -> None:
    for module in _BACKEND_MODULES:
        importlib.import_module(module)


def engine_types() -> list[str]:
    """Names of the registered backends."""
    _load_backends()
    return sorted(_REGISTRY)


def parse_engine_config(raw: Mapping[str, Any]) -> EngineConfig:
    """Validate a raw ``engine:`` mapping into its backend's config class."""
    _load_backends()
    type_name = raw.get("type", "onnxruntime")
    if type_name not in _REGISTRY:
        raise ValueError(f"engine.type: unknown engine {type_name!r}; known: {sorted(_REGISTRY)}")
    config_cls, _ = _REGISTRY[type_name]
    try:
        return config_cls.model_validate({**raw, "type": type_name})
    except ValidationError as exc:
        problems = "; ".join(
            f"engine.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ValueError(f"{problems} (engine type {type_name})") from None


def create_engine(config: EngineConfig | Mapping[str, Any], model_dir: Path) -> Engine:
    """Build (not load) the engine a config asks for, for the model folder ``model_dir``."""
    parsed = config if isinstance(config, EngineConfig) else parse_engine_config(config)
    _load_backends()
    _, factory = _REGISTRY[parsed.type]
    return factory(parsed, model_dir)
