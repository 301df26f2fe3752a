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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moesaic.config import read_yaml_mapping
from moesaic.nodes.batching import DynamicBatchingConfig
from moesaic.nodes.config import format_validation_error
from moesaic.nodes.served import FallbackRefused, ServedModel
from moesaic.nodes.versions import VersionPolicy, find_versions
from moesaic.runtime.engine import EngineConfig, parse_engine_config

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
        log.warning("%s: holds %s and a 1/ folder; 1/ is version 1", folder, ONNX_FILE)
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
