"""Node configuration: YAML file, then ``MOESAIC_NODE_*`` environment overrides, then CLI flags.

.. code-block:: yaml

    node_id: jetson-1
    listen: 0.0.0.0:8001
    models: /opt/moesaic/models
    device: auto
    tls: {cert: node.pem, key: node.key, client_ca: fleet-ca.pem}
    metrics_port: 9101
    watch: true              # load new model versions as they appear (hot swap)

Environment overrides name a field in upper case (``MOESAIC_NODE_LISTEN=0.0.0.0:9000``);
nested fields use a double underscore (``MOESAIC_NODE_TLS__CERT=/run/creds/node.pem``).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moesaic.config import read_yaml_mapping
from moesaic.rpc import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig

__all__ = ["ENV_PREFIX", "NodeConfig", "format_validation_error", "load_node_config"]

ENV_PREFIX = "MOESAIC_NODE_"


class NodeConfig(BaseModel):
    """Everything a node needs besides its model folders."""

    model_config = ConfigDict(extra="forbid")

    node_id: str = Field(default_factory=socket.gethostname, description="Name of this node in the fleet.")
    listen: str = Field(
        "127.0.0.1:8001", description="host:port of the gRPC server (port 0 picks a free one)."
    )
    models: Path | None = Field(None, description="Model repository: one sub-folder per model.")
    device: str = Field("cpu", description="'cpu', 'cuda:N', 'jetson' or 'auto'.")
    max_message_bytes: int = Field(
        DEFAULT_MAX_MESSAGE_BYTES,
        gt=0,
        description="Largest request or reply; larger ones get RESOURCE_EXHAUSTED.",
    )
    max_workers: int = Field(8, ge=1, description="Threads serving requests concurrently.")
    tls: TlsConfig | None = Field(
        None, description="TLS (and mutual TLS with client_ca); plaintext when absent."
    )
    profile: Path | None = Field(
        None, description="Profile file (moesaic profile) advertised in Node/Describe."
    )
    metrics_port: int | None = Field(
        None, ge=0, le=65535, description="Serve Prometheus /metrics on this port."
    )
    metrics_host: str = Field("127.0.0.1", description="Address the metrics endpoint binds.")
    grace_seconds: float = Field(10.0, ge=0, description="How long in-flight requests may finish on SIGTERM.")
    allow_cpu_fallback: bool = Field(
        False,
        description="On a cuda or jetson node, serve a model on the CPU when its engine cannot use the "
        "accelerator; by default the node refuses to start instead.",
    )
    energy_interval_s: float = Field(
        0.1,
        gt=0,
        le=10,
        description="How often the cost meter reads the device's energy source (its own thread).",
    )
    idle_watts: float | None = Field(
        None,
        ge=0,
        description="The device's idle draw; default: learnt from stretches with no work.",
    )
    hang_timeout_s: float = Field(
        60.0,
        gt=0,
        description="An engine call running longer than this marks its model hung: health "
        "NOT_SERVING and the systemd watchdog is no longer fed (systemd restarts the node).",
    )
    watch: bool = Field(
        False,
        description="Poll the model repository and load new or changed model versions on its own "
        "(a swap without downtime; the old version keeps serving when the new one fails to load).",
    )
    watch_interval_s: float = Field(2.0, gt=0, description="How often --watch polls the repository, seconds.")
    probe_interval_s: float = Field(
        30.0,
        gt=0,
        description="A model idle this long gets a probe inference on zeros, so a hung engine is "
        "found without traffic.",
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        host, sep, port = value.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"expected HOST:PORT, got {value!r}")
        return value

    @field_validator("device")
    @classmethod
    def _device(cls, value: str) -> str:
        from moesaic.runtime.devices import parse_device_spec

        parse_device_spec(value)
        return value


def format_validation_error(exc: ValidationError, source: str) -> str:
    """One line per problem, each naming ``source`` and the field path."""
    lines = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(root)"
        lines.append(f"{source}: {where}: {err['msg']}")
    return "\n".join(lines)


def _env_overrides(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in env.items():
        if not key.startswith(ENV_PREFIX):
            continue
        path = key[len(ENV_PREFIX) :].lower().split("__")
        target = out
        for part in path[:-1]:
            target = target.setdefault(part, {})
        target[path[-1]] = value
    return out


def _merge(base: dict[str, Any], extra: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = _merge(dict(merged[key]), value)
        else:
            merged[key] = value
    return merged


def load_node_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Config from ``path`` (optional), ``MOESAIC_NODE_*`` variables, then ``overrides``.

    Raises ``ValueError`` whose lines name the file (or ``environment``) and the field.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(Path(path))
        if isinstance(raw.get("models"), str) and not Path(raw["models"]).is_absolute():
            raw["models"] = str(Path(path).parent / raw["models"])
    env_values = _env_overrides(os.environ if env is None else env)
    if env_values:
        source = f"{source} + environment ({ENV_PREFIX}*)"
    merged = _merge(_merge(raw, env_values), {k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        return NodeConfig.model_validate(merged)
    except ValidationError as exc:
        raise ValueError(format_validation_error(exc, source)) from None
