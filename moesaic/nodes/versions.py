"""Model versions on disk and which of them a node serves (Triton's layout and policies).

A model folder holds either numbered version folders, each with the model's files::

    models/yolo-n/model.yaml        # shared by every version
    models/yolo-n/1/model.onnx
    models/yolo-n/2/model.onnx
    models/yolo-n/2/model.yaml      # optional: keys overriding the shared model.yaml

or the files themselves (``models/yolo-n/model.onnx``), which is version 1 (unless a ``1/``
folder exists); a ``2/model.onnx`` dropped beside them is version 2. ``version_policy``
in model.yaml picks the versions served: ``{latest: N}`` (default ``{latest: 1}``),
``{specific: [1, 3]}`` or ``{all: true}``; Triton's JSON forms (``{"latest": {"num_versions":
2}}``, ``{"specific": {"versions": [1]}}``, ``{"all": {}}``) are accepted too.

>>> VersionPolicy.model_validate({"latest": 2}).select([1, 2, 3])
[2, 3]
>>> VersionPolicy.model_validate({"specific": {"versions": [1, 4]}}).select([1, 2, 3])
[1]
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

__all__ = ["VersionPolicy", "find_versions", "fingerprint", "has_model_files"]

MODEL_FILES = ("model.yaml", "model.onnx")
"""A folder holding one of these is a model (or a version of one)."""


class VersionPolicy(BaseModel):
    """Which versions of a model are served; exactly one of the three."""

    model_config = ConfigDict(extra="forbid")

    latest: int | None = Field(None, ge=1, description="Serve the highest N versions.")
    specific: list[int] | None = Field(None, description="Serve exactly these versions (those present).")
    all: bool = Field(False, description="Serve every version present.")

    @model_validator(mode="before")
    @classmethod
    def _triton_forms(cls, value: Any) -> Any:
        """Accept Triton's JSON: ``latest: {num_versions: N}``, ``specific: {versions: [...]}``,
        ``all: {}``."""
        if not isinstance(value, dict):
            return value
        out = dict(value)
        if isinstance(out.get("latest"), dict):
            out["latest"] = out["latest"].get("num_versions", 1)
        if isinstance(out.get("specific"), dict):
            out["specific"] = out["specific"].get("versions", [])
        if isinstance(out.get("all"), dict):
            out["all"] = True
        return out

    @model_validator(mode="after")
    def _one_choice(self) -> VersionPolicy:
        chosen = [n for n in ("latest", "specific", "all") if getattr(self, n) not in (None, False)]
        if len(chosen) > 1:
            raise ValueError(f"choose one of latest, specific, all; got {', '.join(chosen)}")
        if not chosen:
            self.latest = 1
        if self.specific is not None and any(v < 1 for v in self.specific):
            raise ValueError(f"specific: versions are numbers >= 1, got {self.specific}")
        return self

    def select(self, available: list[int]) -> list[int]:
        """The versions of ``available`` this policy serves, ascending."""
        present = sorted(set(available))
        if self.all:
            return present
        if self.specific is not None:
            return [v for v in present if v in set(self.specific)]
        return present[-(self.latest or 1) :]

    def describe(self) -> str:
        if self.all:
            return "all"
        if self.specific is not None:
            return f"specific {self.specific}"
        return f"latest {self.latest}"


def has_model_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in MODEL_FILES)


def find_versions(folder: Path) -> dict[int, Path]:
    """``{version: folder with its files}``: numbered sub-folders, and the folder's own
    ``model.onnx`` (or a model.yaml alone) as version 1 unless a ``1/`` folder exists.

    So a flat folder is version 1, and dropping ``2/model.onnx`` beside its ``model.onnx``
    adds version 2. Empty when the folder holds neither (not a model). Sub-folders named
    ``0`` or not a plain number are ignored, as Triton does.
    """
    found = {
        int(child.name): child
        for child in folder.iterdir()
        if child.is_dir() and child.name.isdigit() and int(child.name) >= 1
    }
    flat = (folder / "model.onnx").is_file() or (not found and (folder / "model.yaml").is_file())
    if flat and 1 not in found:
        found[1] = folder
    return dict(sorted(found.items()))


def fingerprint(folder: Path, *, depth: int = 2) -> tuple[tuple[str, int, int], ...]:
    """Every file under ``folder`` (``depth`` levels) with its size and mtime: what the
    repository watcher compares between polls."""
    out: list[tuple[str, int, int]] = []

    def walk(path: Path, level: int) -> None:
        try:
            entries = list(os.scandir(path))
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            try:
                if entry.is_dir():
                    if level < depth:
                        walk(Path(entry.path), level + 1)
                elif entry.is_file():
                    st = entry.stat()
                    out.append((os.path.relpath(entry.path, folder), st.st_size, st.st_mtime_ns))
            except OSError:
                continue

    walk(folder, 0)
    return tuple(sorted(out))
