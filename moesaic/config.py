"""Shared config loading: YAML files into pydantic models, errors naming the file and field.

>>> from pydantic import BaseModel
>>> class Settings(BaseModel):
...     port: int
>>> load_model(Settings, None, port="x", what="settings")
Traceback (most recent call last):
ValueError: settings: port: Input should be a valid integer, unable to parse string as an integer
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

__all__ = [
    "describe_errors",
    "field_path",
    "load_model",
    "read_text_file",
    "read_yaml_mapping",
    "yaml_problem",
]

M = TypeVar("M", bound=BaseModel)


def field_path(loc: tuple[int | str, ...]) -> str:
    """``("nodes", 0, "address")`` -> ``nodes[0].address``."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def describe_errors(exc: ValidationError, limit: int = 4) -> str:
    """Every validation error as ``field: message``, joined with ``; ``."""
    parts = [f"{field_path(tuple(e['loc']))}: {e['msg']}" for e in exc.errors()[:limit]]
    if exc.error_count() > limit:
        parts.append(f"and {exc.error_count() - limit} more errors")
    return "; ".join(parts)


def read_text_file(path: Path) -> str:
    """The UTF-8 text of ``path``; ``ValueError`` with one line naming the file when it cannot
    be read or is not text (a binary file given where a config was expected)."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: not a text file (byte 0x{exc.object[exc.start]:02x} at offset {exc.start} is not UTF-8)"
        ) from None


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parser error in one line: ``line 2 column 3: expected ..., but found '-'``."""
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    where = f"line {mark.line + 1} column {mark.column + 1}: " if mark is not None else ""
    return f"{where}{problem}"


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``); ``ValueError`` naming the file."""
    text = read_text_file(path)
    try:
        loaded = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {yaml_problem(exc)}") from None
    if not isinstance(loaded, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    return loaded


def load_model(model: type[M], path: Path | None, *, what: str, **overrides: object) -> M:
    """Validate ``path``'s YAML (if any) with the non-None ``overrides`` on top."""
    data: dict[str, Any] = read_yaml_mapping(path) if path is not None else {}
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ValueError(f"{path or what}: {describe_errors(exc)}") from None
