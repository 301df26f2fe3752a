"""One model version loaded on a node: engine, processor, advertised tensors, queue, users.

:class:`ServedModel` is what the data plane runs; :mod:`moesaic.nodes.repository` builds it
from a model folder and :mod:`moesaic.nodes.lifecycle` loads, swaps and retires it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from moesaic.errors import InvalidInput, Unavailable
from moesaic.nodes.batching import DynamicBatcher, check_batchable, zero_inputs
from moesaic.nodes.scheduling import ModelQueue
from moesaic.runtime.cost import CostMeter
from moesaic.runtime.devices import DeviceInfo
from moesaic.runtime.engine import Engine, EngineConfig, TensorSpec, create_engine
from moesaic.runtime.processing import Processor, create_processor
from moesaic.runtime.profiler import ProfileRecord, load_profile_file

if TYPE_CHECKING:
    from moesaic.nodes.spec import ModelSpec

__all__ = ["FallbackRefused", "ServedModel"]

log = logging.getLogger(__name__)

MODEL_FILE = "model.yaml"
PROFILE_FILE = "profile.json"
"""A version folder's own profile (``moesaic import-model`` writes it), shown in Describe."""


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
        self.profiles: list[ProfileRecord] = []
        """The version's own ``profile.json`` records for this device (``moesaic import-model``)."""
        self._lock = threading.Lock()
        self._users = 0
        self._retiring = False
        self._users_lock = threading.Lock()  # acquire/release take it bare: every request does
        self._idle = threading.Condition(self._users_lock)

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
        with self._users_lock:
            if self._retiring:
                return False
            self._users += 1
            return True

    def release(self) -> None:
        with self._users_lock:
            self._users -= 1
            if self._users <= 0 and self._retiring:  # only retire() waits for it
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
                if processor is not None:
                    processor.place(described.device)  # e.g. BEV encoding on the engine's GPU
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
                self.profiles = _own_profile(self.folder / PROFILE_FILE, self.name, device.id)
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


def _own_profile(path: Path, name: str, device: str) -> list[ProfileRecord]:
    """Records of ``path`` for this model on this device; a bad file is logged, not fatal."""
    if not path.is_file():
        return []
    try:
        records = load_profile_file(path)
    except (ValueError, OSError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return []
    return [r for r in records if r.model == name and r.device == device]
