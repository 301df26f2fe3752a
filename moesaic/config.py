"""The one settings loader of every role, and the YAML helpers it is built on.

:func:`load_settings` validates one pydantic model per role (node, coordinator, ingest,
dashboard) from, in order of precedence:

1. command-line overrides (the flags of ``moesaic node``, ``moesaic ingest``, ...);
2. ``MOESAIC_<ROLE>_<FIELD>`` environment variables, nested fields joined with ``__``
   (``MOESAIC_NODE_TLS__CERT=/etc/moesaic/node.pem``); a mapping or list is written as YAML
   (``MOESAIC_COORDINATOR_DEFAULT_BUDGET='{latency_ms: 40}'``);
3. the credentials directory ``$CREDENTIALS_DIRECTORY`` (systemd ``LoadCredential=``): a file
   named like a field, nested with ``__`` as for the environment, supplies it: a text field
   (``password``) gets the file's text without its final newline, a path field (``tls__key``)
   gets the file's path, so keys never need a copy on disk;
4. the YAML file;
5. the model's defaults.

Every model forbids unknown keys at every level, and so does the loader for unknown
``MOESAIC_<ROLE>_*`` variables. An error names where the bad value came from (the file, the
variable, the credential or the command line) and the field, one line per problem::

    coordinator.yaml: tasks.detection.budgett: Extra inputs are not permitted

The environment and credential sources are pydantic-settings' ``EnvSettingsSource`` and a
``PydanticBaseSettingsSource``; the YAML is read here so that a broken file is one line naming
its line and column.

>>> from pydantic import BaseModel
>>> class Settings(BaseModel):
...     port: int
>>> load_model(Settings, None, port="x", what="settings")
Traceback (most recent call last):
ValueError: settings: port: Input should be a valid integer, unable to parse string as an integer
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar, cast

import yaml
from pydantic import BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, PydanticBaseSettingsSource, SettingsError
from pydantic_settings.sources.utils import parse_env_vars

__all__ = [
    "CREDENTIALS_VARIABLE",
    "ENV_NESTED_DELIMITER",
    "describe_errors",
    "env_prefix",
    "field_path",
    "load_model",
    "load_settings",
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


# -- the settings loader ---------------------------------------------------------------------

ENV_NESTED_DELIMITER = "__"
"""Joins the levels of a nested field in variable and credential names: ``TLS__CERT``."""
CREDENTIALS_VARIABLE = "CREDENTIALS_DIRECTORY"
"""Where systemd puts a unit's ``LoadCredential=`` files."""
_CREDENTIAL_MAX_BYTES = 1 << 20


def env_prefix(role: str) -> str:
    """``node`` -> ``MOESAIC_NODE_``."""
    return f"MOESAIC_{role.upper()}_"


class _Layer:
    """One source's values and how to name where a value came from."""

    def __init__(self, name: str, data: dict[str, Any], names: Mapping[tuple[str, ...], str] | None = None):
        self.name = name
        self.data = data
        self.names = dict(names or {})

    def origin(self, loc: tuple[int | str, ...]) -> str | None:
        """The source of the value at ``loc`` (None when this layer has none)."""
        for size in range(len(loc), 0, -1):
            name = self.names.get(tuple(str(p) for p in loc[:size]))
            if name is not None:
                return name
        if self.names:
            return None
        node: Any = self.data
        for part in loc:
            present = (
                part in node
                if isinstance(node, Mapping)
                else (isinstance(node, list) and isinstance(part, int) and part < len(node))
            )
            if not present:
                return None
            node = node[part]
        return self.name if loc else None


class _Environment(EnvSettingsSource):
    """pydantic-settings' environment source over a given mapping; complex values are YAML."""

    def __init__(self, model: type[BaseModel], prefix: str, env: Mapping[str, str]) -> None:
        self._given = env
        super().__init__(
            cast(Any, model),
            case_sensitive=False,
            env_prefix=prefix,
            env_nested_delimiter=ENV_NESTED_DELIMITER,
        )

    def _load_env_vars(self) -> Mapping[str, str | None]:
        return parse_env_vars(self._given, case_sensitive=False)

    def decode_complex_value(self, field_name: str, field: FieldInfo, value: Any) -> Any:
        try:
            return yaml.safe_load(value)  # YAML holds JSON: {"a": 1} and {a: 1} both work
        except yaml.YAMLError as exc:
            raise ValueError(yaml_problem(exc)) from None


def _unwrap(annotation: Any) -> list[Any]:
    """The members of ``X | None`` and ``Optional[X]``, or ``[annotation]``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _credential_fields(
    model: type[BaseModel], prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], bool]]:
    """(field path, is a path) of every text or path field, nested models included."""
    for name, field in model.model_fields.items():
        for kind in _unwrap(field.annotation):
            if isinstance(kind, type) and issubclass(kind, BaseModel):
                yield from _credential_fields(kind, (*prefix, name))
            elif kind in (str, SecretStr, Path):
                yield (*prefix, name), kind is Path


class _Credentials(PydanticBaseSettingsSource):
    """Fields from systemd's credentials directory, one file per field (``tls__key``)."""

    def __init__(self, model: type[BaseModel], directory: Path) -> None:
        super().__init__(cast(Any, model))
        self.directory = directory
        self.names: dict[tuple[str, ...], str] = {}

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # __call__ walks the nested fields itself

    def __call__(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for path, is_path in _credential_fields(self.settings_cls):
            file = self.directory / ENV_NESTED_DELIMITER.join(path)
            if not file.is_file():
                continue
            if is_path:
                value: str = str(file)
            else:
                if file.stat().st_size > _CREDENTIAL_MAX_BYTES:
                    raise ValueError(f"credential {file}: larger than {_CREDENTIAL_MAX_BYTES} bytes")
                value = read_text_file(file).rstrip("\r\n")
            target = out
            for part in path[:-1]:
                target = target.setdefault(part, {})
            target[path[-1]] = value
            self.names[path] = f"credential {file}"
        return out


def _merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; mappings present in both merge key by key."""
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def _drop_none(values: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, Mapping):
            value = _drop_none(value)
            if value:
                out[key] = value
        elif value is not None:
            out[key] = value
    return out


def _within(section: str | None, values: dict[str, Any]) -> dict[str, Any]:
    return {section: values} if section and values else values


def _env_layer(
    model: type[BaseModel],
    role: str,
    env: Mapping[str, str],
    section: str | None,
    aliases: Mapping[str, str],
) -> _Layer:
    prefix = env_prefix(role)
    target = model
    if section is not None:
        annotation = model.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        target = annotation
    given: dict[str, str] = {}
    names: dict[tuple[str, ...], str] = {}
    where = (section,) if section else ()
    for key, value in env.items():
        if not key.upper().startswith(prefix):
            continue
        path = tuple(key[len(prefix) :].lower().split(ENV_NESTED_DELIMITER))
        if path[0] not in target.model_fields:
            raise ValueError(f"environment {key}: {section or role} has no setting {path[0]!r}")
        given[key] = value
        names[(*where, *path)] = f"environment {key}"
    for alias, field in aliases.items():
        canonical = prefix + field.upper()
        if alias in env and not any(k.upper() == canonical for k in given):
            given[canonical] = env[alias]
            names[(*where, *field.lower().split(ENV_NESTED_DELIMITER))] = f"environment {alias}"
    if not given:
        return _Layer("environment", {})
    try:
        values = _Environment(target, prefix, given)()
    except SettingsError as exc:  # a mapping or list that is not YAML
        cause = f": {exc.__cause__}" if exc.__cause__ else ""
        raise ValueError(f"environment ({prefix}*): {exc}{cause}") from None
    return _Layer(f"environment ({prefix}*)", _within(section, values), names)


def _credentials_layer(model: type[BaseModel], env: Mapping[str, str], section: str | None) -> _Layer:
    directory = env.get(CREDENTIALS_VARIABLE)
    if not directory or not Path(directory).is_dir():
        return _Layer("credentials", {})
    target = model
    if section is not None:
        annotation = model.model_fields[section].annotation
        assert isinstance(annotation, type) and issubclass(annotation, BaseModel)
        target = annotation
    source = _Credentials(target, Path(directory))
    values = source()
    where = (section,) if section else ()
    return _Layer(
        f"credentials ({directory})",
        _within(section, values),
        {(*where, *path): name for path, name in source.names.items()},
    )


def load_settings(
    model: type[M],
    path: Path | None = None,
    *,
    role: str,
    data: Mapping[str, Any] | None = None,
    source: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    env_section: str | None = None,
    env_aliases: Mapping[str, str] | None = None,
    prepare_file: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> M:
    """One role's settings: ``overrides`` > environment > credentials > ``path`` (or ``data``) > defaults.

    ``role`` names the variables (``MOESAIC_<ROLE>_*``); ``env`` defaults to ``os.environ`` and
    also gives ``$CREDENTIALS_DIRECTORY``. ``env_section`` makes the variables and credentials
    address the fields of that sub-model (the coordinator's ``coordinator:``). ``env_aliases``
    maps other variable names to a field (``{"MOESAIC_MQTT_PASSWORD": "password"}``); the role's
    own variable wins over an alias. ``prepare_file`` adjusts the file's values before they
    merge (paths relative to the file). ``None`` in ``overrides`` means "not given".

    Raises ``ValueError`` with one line per problem, each naming its source and the field.
    """
    env = os.environ if env is None else env
    name = source or (str(path) if path is not None else f"{role} settings")
    if data is None:
        file_data: Any = read_yaml_mapping(path) if path is not None else {}
    elif isinstance(data, Mapping):
        file_data = dict(data)
    else:
        raise ValueError(f"{name}: expected a mapping at the top level")
    if prepare_file is not None and file_data:
        file_data = prepare_file(file_data)
    layers = [
        _Layer(name, file_data),
        _credentials_layer(model, env, env_section),
        _env_layer(model, role, env, env_section, env_aliases or {}),
        _Layer("command line", _drop_none(overrides or {})),
    ]
    merged: dict[str, Any] = {}
    for layer in layers:
        merged = _merge(merged, layer.data)
    try:
        return model.model_validate(merged)
    except ValidationError as exc:
        raise ValueError(_describe(exc, layers, name)) from None


def _describe(exc: ValidationError, layers: list[_Layer], fallback: str, limit: int = 8) -> str:
    lines = []
    for error in exc.errors()[:limit]:
        loc = tuple(error["loc"])
        origin = next((o for layer in reversed(layers) if (o := layer.origin(loc))), None)
        if origin is None:  # a missing field, or a check across fields: the shallowest source
            origin = next(
                (
                    o
                    for size in range(len(loc) - 1, 0, -1)
                    for layer in reversed(layers)
                    if (o := layer.origin(loc[:size]))
                ),
                fallback,
            )
        lines.append(f"{origin}: {field_path(loc)}: {error['msg']}")
    if exc.error_count() > limit:
        lines.append(f"{fallback}: and {exc.error_count() - limit} more errors")
    return "\n".join(lines)
