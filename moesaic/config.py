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

__all__ = ["describe_errors", "field_path", "load_model", "read_yaml_mapping"]

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


def read_yaml_mapping(path: Path) -> dict[str, Any]:
    """The mapping a YAML file holds (empty file: ``{}``); ``ValueError`` naming the file."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: not valid YAML: {exc}") from None
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
