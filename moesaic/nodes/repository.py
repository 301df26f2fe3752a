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

from pydantic import ValidationError

from moesaic.config import read_yaml_mapping
from moesaic.nodes.config import format_validation_error
from moesaic.nodes.served import FallbackRefused, ServedModel
from moesaic.nodes.spec import ModelSpec
from moesaic.nodes.versions import find_versions
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
