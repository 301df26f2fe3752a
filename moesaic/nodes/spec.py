"""What one ``model.yaml`` holds: :class:`ModelSpec`, validated, no I/O.

Below both :mod:`moesaic.nodes.repository` (which reads the files into it) and
:mod:`moesaic.nodes.served` (which serves a model by it), so neither imports the other's way
round (an import-linter contract in pyproject.toml keeps it so).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moesaic.nodes.batching import DynamicBatchingConfig
from moesaic.nodes.versions import VersionPolicy

__all__ = ["ModelSpec"]


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
