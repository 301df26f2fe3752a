"""The model repository: one folder per model, like a Triton model repository.

A folder holding only ``model.onnx`` is served as is (ONNX Runtime, inputs and outputs read
from the graph) as version 1; numbered sub-folders (``yolo-n/1/model.onnx``,
``yolo-n/2/model.onnx``) are versions, served by ``version_policy``
(:mod:`moesaic.nodes.versions`). An optional ``model.yaml`` (beside the version folders; a
version folder may hold one too, whose keys override the shared one) adds::

    name: ppn-seg            # default: the folder name
    task: bev_segmentation   # what the coordinator selects it for
    description: PPN segmentation head, 0.2 m BEV cells
    engine: {type: onnxruntime, intra_op_threads: 2}
    processor: {type: ppn_bev, frames: 4}   # node then advertises the processor's tensors
    max_batch_size: 8        # largest first dimension accepted; 0 = no batch limit
    instances: 1             # requests that run at once; the rest queue, earliest deadline first
    dynamic_batching: {max_batch_size: 8, max_queue_delay_us: 2000}  # merge concurrent requests
    class_names: [road, car, person]
    version_policy: {latest: 1}   # or {specific: [1, 3]} or {all: true}
    synthetic: false         # true: trained on generated data only (said in Describe, detect)
    input_format: ""         # what the model takes; default: from the processor or the tensors

Unknown keys fail, and every error names the file and the field.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moesaic.config import read_yaml_mapping
from moesaic.errors import InvalidInput, Unavailable
from moesaic.nodes.batching import DynamicBatcher, DynamicBatchingConfig, check_batchable, zero_inputs
from moesaic.nodes.config import format_validation_error
from moesaic.nodes.scheduling import ModelQueue
from moesaic.nodes.versions import VersionPolicy, find_versions
from moesaic.runtime.cost import CostMeter
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.engine import Engine, EngineConfig, TensorSpec, create_engine, parse_engine_config
from moesaic.runtime.processing import Processor, create_processor

__all__ = [
    "FallbackRefused",
    "ModelEntry",
    "ModelSpec",
    "ServedModel",
    "load_model_spec",
    "read_model_entry",
    "scan_models",
    "scan_repository",
]

log = logging.getLogger(__name__)

MODEL_FILE = "model.yaml"
ONNX_FILE = "model.onnx"


class ModelSpec(BaseModel):
    """The contents of one ``model.yaml``."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(description="Model name clients use; default: the folder name.")
    task: str = Field(
        "", description="bev_segmentation, bev_reconstruction, detection, vlm, or anything else."
    )
    description: str = Field("", description="Free text shown in Node/Describe.")
    engine: dict[str, Any] = Field(
        default_factory=lambda: {"type": "onnxruntime"}, description="Engine config."
    )
    processor: dict[str, Any] | None = Field(
        None, description="Pre/post-processing: {type: NAME, ...options}."
    )
    max_batch_size: int = Field(0, ge=0, description="Largest first dimension accepted; 0 = no limit.")
    instances: int = Field(
        1,
        ge=1,
        le=64,
        description="Requests of this model that run at once (like Triton's instance count); the "
        "rest wait in the model's earliest-deadline-first queue.",
    )
    dynamic_batching: DynamicBatchingConfig | None = Field(
        None,
        description="Merge requests arriving within a short delay into one engine call (along "
        "dimension 0); the engine must batch along its first dimension.",
    )
    class_names: list[str] = Field(default_factory=list, description="Class names, index = class id.")
    version_policy: VersionPolicy = Field(
        default_factory=lambda: VersionPolicy.model_validate({}),
        description="Which numbered version folders are served: {latest: N} (default 1), "
        "{specific: [..]} or {all: true}.",
    )
    synthetic: bool = Field(
        False,
        description="Trained on generated (synthetic) data only: expect poor accuracy on real "
        "sensor data. Reported in Node/Describe, ModelConfig and by `moesaic detect`.",
    )
    input_format: str = Field(
        "", description="What the model takes, in words; default: from the processor or the tensors."
    )

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not value or "/" in value or value.strip() != value:
            raise ValueError(f"model name must be non-empty without '/' or surrounding spaces, got {value!r}")
        return value

    @field_validator("processor")
    @classmethod
    def _processor(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None and not isinstance(value.get("type"), str):
            raise ValueError("processor needs a 'type' naming a registered processor")
        return value


class FallbackRefused(RuntimeError):
    """A model would run on the CPU of an accelerator node, and the node does not allow that."""


def _fallback_reason(engine: str, device: DeviceInfo, details: Mapping[str, str]) -> str:
    if engine == "onnxruntime":
        missing = (
            f"ONNX Runtime has no GPU execution provider here (available: {details.get('available', '?')}); "
            "install onnxruntime-gpu in place of onnxruntime (NVIDIA's onnxruntime wheel on a Jetson)"
        )
    else:
        missing = f"the {engine} engine placed it on the CPU"
    return (
        f"would run on cpu, not {device.id}: {missing}; or start the node with --allow-cpu-fallback "
        "(allow_cpu_fallback: true) to serve it on the CPU anyway"
    )


VERSION_ONLY_FORBIDDEN = ("name", "version_policy")
"""Keys a version folder's model.yaml may not set (they belong to the model)."""


def load_model_spec(
    folder: Path,
    *,
    version_folder: Path | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> tuple[ModelSpec, EngineConfig]:
    """Spec and validated engine config of one model folder; ``ValueError`` naming file and field.

    ``version_folder``'s own ``model.yaml`` (if any) overrides keys of the shared one;
    ``overrides`` (a load request's config) go on top of both.
    """
    path = folder / MODEL_FILE
    raw: dict[str, Any] = {}
    if path.is_file():
        raw = read_yaml_mapping(path)
    elif not (folder / ONNX_FILE).is_file() and not find_versions(folder):
        raise ValueError(f"{folder}: neither {MODEL_FILE}, {ONNX_FILE} nor version folders found")
    source = str(path)
    if version_folder is not None and version_folder != folder and (version_folder / MODEL_FILE).is_file():
        extra = read_yaml_mapping(version_folder / MODEL_FILE)
        for key in VERSION_ONLY_FORBIDDEN:
            if key in extra:
                raise ValueError(
                    f"{version_folder / MODEL_FILE}: {key}: belongs in {path}, not in a version folder"
                )
        raw = {**raw, **extra}
        source = f"{path} + {version_folder / MODEL_FILE}"
    if overrides:
        raw = {**raw, **overrides}
        source = f"{source} + load config"
    raw.setdefault("name", folder.name)
    try:
        spec = ModelSpec.model_validate(raw)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source)) from None
    try:
        engine = parse_engine_config(spec.engine)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return spec, engine


@dataclass
class ModelEntry:
    """One model folder of the repository: its shared spec and the versions on disk."""

    name: str
    folder: Path
    spec: ModelSpec
    versions: dict[int, Path]
    overrides: Mapping[str, Any] | None = None

    def served_versions(self) -> list[int]:
        """The versions ``version_policy`` serves, ascending (empty: none present)."""
        return self.spec.version_policy.select(list(self.versions))

    def build(self, version: int) -> ServedModel:
        """The (not yet loaded) :class:`ServedModel` of one version; ``ValueError`` when its
        folder's model.yaml is wrong."""
        folder = self.versions[version]
        spec, engine = load_model_spec(self.folder, version_folder=folder, overrides=self.overrides)
        return ServedModel(folder, spec, engine, version=version, model_folder=self.folder)


def read_model_entry(folder: Path, overrides: Mapping[str, Any] | None = None) -> ModelEntry | None:
    """The model of ``folder``, or None when it holds no model files; ``ValueError`` when wrong."""
    versions = find_versions(folder)
    if not versions:
        return None
    if versions.get(1) != folder and (folder / ONNX_FILE).is_file():
        log.warning(
            "%s: holds %s and version folders %s; the version folders are served",
            folder,
            ONNX_FILE,
            sorted(versions),
        )
    spec, _ = load_model_spec(folder, overrides=overrides)
    return ModelEntry(spec.name, folder, spec, versions, overrides)


def scan_repository(root: Path) -> dict[str, ModelEntry]:
    """Every model folder under ``root`` by model name (sorted by folder name).

    A sub-folder with no model files and no version folders is skipped with a warning.
    """
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"models: {root} is not a directory")
    entries: dict[str, ModelEntry] = {}
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        entry = read_model_entry(folder)
        if entry is None:
            log.warning(
                "skipping %s: no %s, no %s and no numbered version folders (1/, 2/, ...)",
                folder,
                MODEL_FILE,
                ONNX_FILE,
            )
            continue
        if entry.name in entries:
            raise ValueError(
                f"{folder / MODEL_FILE}: name: {entry.name!r} is also used by {entries[entry.name].folder}"
            )
        entries[entry.name] = entry
    return entries


def scan_models(root: Path) -> list[ServedModel]:
    """Every served version of every model folder under ``root`` (sorted by name), not loaded."""
    return [
        entry.build(version)
        for entry in scan_repository(root).values()
        for version in entry.served_versions()
    ]


class ServedModel:
    """One version of a model on this node: its engine, optional processor, advertised tensors,
    queue, and the requests holding it (:meth:`acquire`), so an old version retired by a swap
    finishes its in-flight requests before it closes.

    States: ``loading``, ``ready``, ``failed``, ``hung``, ``unloading`` (retired, in-flight
    requests finishing) and ``unloaded``.
    """

    def __init__(
        self,
        folder: Path,
        spec: ModelSpec,
        engine_config: EngineConfig,
        *,
        version: int = 1,
        model_folder: Path | None = None,
    ) -> None:
        self.folder = folder
        """Where the version's files are (the engine's and processor's folder)."""
        self.model_folder = model_folder or folder
        self.spec = spec
        self.name = spec.name
        self.version = version
        self.version_str = str(version)
        self.engine_config = engine_config
        self.queue = ModelQueue(spec.name, slots=spec.instances)
        self.loaded_at = 0.0
        self.state = "loading"
        self.error = ""
        self.engine: Engine | None = None
        self.processor: Processor | None = None
        self.inputs: tuple[TensorSpec, ...] = ()
        self.outputs: tuple[TensorSpec, ...] = ()
        self.input_specs: dict[str, TensorSpec] = {}
        self.output_names: frozenset[str] = frozenset()
        self.device = ""
        self.provider = ""
        self.class_names: list[str] = list(spec.class_names)
        self.batcher: DynamicBatcher | None = None
        self.input_format = spec.input_format
        self._lock = threading.Lock()
        self._users = 0
        self._retiring = False
        self._idle = threading.Condition(threading.Lock())

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    @property
    def engine_type(self) -> str:
        return self.engine_config.type

    @property
    def spec_path(self) -> Path:
        return self.model_folder / MODEL_FILE

    # -------------------------------------------------------------- requests holding it

    def acquire(self) -> bool:
        """Count one request on this version; False once it is retired (look it up again)."""
        with self._idle:
            if self._retiring:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._idle:
            self._users -= 1
            if self._users <= 0:
                self._idle.notify_all()

    @property
    def users(self) -> int:
        """Requests holding this version now."""
        return self._users

    def retire(self, timeout: float | None) -> bool:
        """Take no new requests, wait for those holding it (``timeout`` seconds at most), then
        close. True when every request finished before the engine closed."""
        with self._idle:
            self._retiring = True
            if self.state in ("ready", "hung"):
                self.state = "unloading"
            self.drain()
            finished = self._idle.wait_for(lambda: self._users <= 0, timeout)
        self.close()
        self.state = "unloaded"
        return finished

    def _config_for(self, device: DeviceInfo) -> EngineConfig:
        config = self.engine_config
        fields = type(config).model_fields
        if "providers" in fields and getattr(config, "providers", None) is None and device.kind == "cpu":
            config = config.model_copy(update={"providers": ["CPUExecutionProvider"]})
        if "device_id" in fields and device.kind == "cuda" and "device_id" not in config.model_fields_set:
            config = config.model_copy(update={"device_id": device.index})
        if "device" in fields and "device" not in config.model_fields_set:
            # An engine with its own device choice runs where the node was told to run.
            config = config.model_copy(update={"device": device.id if device.kind == "cuda" else "cpu"})
        return config

    def load(
        self,
        device: DeviceInfo,
        *,
        cost: CostMeter | None = None,
        on_batch: Callable[[int, int], None] | None = None,
        allow_cpu_fallback: bool = False,
    ) -> None:
        """Build and warm up the engine (and processor); on failure the model is ``failed``.

        With ``dynamic_batching`` the engine is checked to batch along dimension 0 and a
        :class:`~moesaic.nodes.batching.DynamicBatcher` starts; ``cost`` is told of each batch's
        busy time and ``on_batch(rows, requests)`` is told of every engine call it makes.
        """
        with self._lock:
            engine: Engine | None = None
            try:
                engine = create_engine(self._config_for(device), self.folder)
                engine.load()
                described = engine.describe()
                if device.kind != "cpu" and described.device == "cpu" and not allow_cpu_fallback:
                    raise FallbackRefused(_fallback_reason(self.engine_type, device, described.details))
                batching = self.spec.dynamic_batching
                if batching is not None:
                    check_batchable(described, engine.infer, f"{self.spec_path}: dynamic_batching")
                processor = (
                    create_processor(self.spec.processor, self.folder) if self.spec.processor else None
                )
                self.inputs = processor.inputs(described.inputs) if processor else described.inputs
                self.outputs = processor.outputs(described.outputs) if processor else described.outputs
                if processor and processor.class_names():
                    self.class_names = processor.class_names()
                if not self.input_format:
                    self.input_format = _input_format(processor, self.inputs)
                self.device = described.device
                self.provider = described.details.get("provider", described.backend)
                self.input_specs = {s.name: s for s in self.inputs}
                self.output_names = frozenset(s.name for s in self.outputs)
                if batching is not None:
                    self.batcher = DynamicBatcher(
                        self.name, engine.infer, batching, cost=cost, on_batch=on_batch
                    )
                self.engine, self.processor = engine, processor
                self.state, self.error = "ready", ""
                self.loaded_at = time.time()
            except Exception as exc:
                if engine is not None:
                    engine.close()
                self.state, self.error = "failed", f"{type(exc).__name__}: {exc}"
                log.error(
                    "model %s version %d (%s) failed to load: %s",
                    self.name,
                    self.version,
                    self.folder,
                    self.error,
                )

    def preprocess(
        self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]
    ) -> tuple[Mapping[str, np.ndarray], Any]:
        """Engine inputs and the processor's context; :class:`InvalidInput` when the input is bad.

        A processor reports what is wrong with a request as a ``ValueError``: here, before any
        engine work, that becomes the client's error.
        """
        processor = self.processor
        if processor is None:
            return inputs, None
        try:
            return processor.preprocess(inputs, parameters)
        except InvalidInput:
            raise
        except ValueError as exc:
            raise InvalidInput(f"model {self.name!r}: {exc}", reason="bad_input") from None

    def run(self, engine_inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One engine call (``Unavailable`` when the model is not loaded).

        An engine reports bad input as ``ValueError`` (the Engine contract): without a processor
        the input is the client's, so that is :class:`InvalidInput`; behind a processor it is the
        processor's output, a bug (INTERNAL).
        """
        engine = self.engine
        if engine is None:
            raise Unavailable(f"model {self.name!r} is not loaded")
        try:
            return engine.infer(engine_inputs)
        except InvalidInput:
            raise
        except ValueError as exc:
            if self.processor is not None:
                raise
            raise InvalidInput(f"model {self.name!r}: {exc}", reason="bad_input") from None

    def zero_inputs(self) -> dict[str, np.ndarray]:
        """Zeros for one engine call (batch 1): the liveness probe's input."""
        engine = self.engine
        if engine is None:
            raise Unavailable(f"model {self.name!r} is not loaded")
        return zero_inputs(engine.describe())

    def postprocess(self, outputs: dict[str, np.ndarray], context: Any) -> dict[str, np.ndarray]:
        processor = self.processor
        return outputs if processor is None else processor.postprocess(outputs, context)

    def infer(self, inputs: Mapping[str, np.ndarray], parameters: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Pre-process, engine, post-process on validated inputs (no queue, no accounting)."""
        engine_inputs, context = self.preprocess(inputs, parameters)
        return self.postprocess(self.run(engine_inputs), context)

    def drain(self) -> None:
        """Send queued requests at once from now on (shutdown)."""
        if self.batcher is not None:
            self.batcher.drain()

    def close(self) -> None:
        with self._lock:
            if self.batcher is not None:
                self.batcher.close()
            self.batcher = None
            if self.engine is not None:
                self.engine.close()
            self.engine = None
            if self.state == "ready":
                self.state = "loading"


def _input_format(processor: Processor | None, inputs: tuple[TensorSpec, ...]) -> str:
    """The processor's words for its input, else the tensors: ``x: FP32 [-1, 4]``."""
    described = getattr(processor, "input_format", None)
    if callable(described):
        text = described()
        if isinstance(text, str) and text:
            return text
    return "; ".join(f"{s.name}: {s.datatype} {list(s.shape)}" for s in inputs)
