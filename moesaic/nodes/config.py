"""Node configuration: YAML file, credentials, ``MOESAIC_NODE_*`` environment overrides, CLI flags.

.. code-block:: yaml

    node_id: jetson-1
    listen: 0.0.0.0:8001
    models: /opt/moesaic/models
    device: auto
    tls: {cert: node.pem, key: node.key, client_ca: fleet-ca.pem}
    metrics_port: 9101
    watch: true              # load new model versions as they appear (hot swap)

Environment overrides name a field in upper case (``MOESAIC_NODE_LISTEN=0.0.0.0:9000``);
nested fields use a double underscore (``MOESAIC_NODE_TLS__CERT=/run/creds/node.pem``). Under
systemd, a credential named like the field (``LoadCredential=tls__key:/etc/moesaic/node.key``)
sets it too. Precedence and error format: :func:`moesaic.config.load_settings`.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moesaic.config import env_prefix, load_settings
from moesaic.rpc import DEFAULT_MAX_MESSAGE_BYTES, TlsConfig

__all__ = ["ENV_PREFIX", "NodeConfig", "format_validation_error", "load_node_config"]

ENV_PREFIX = env_prefix("node")


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


def load_node_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> NodeConfig:
    """Config from ``overrides`` (CLI flags), ``MOESAIC_NODE_*`` variables, ``$CREDENTIALS_DIRECTORY``,
    then ``path`` (optional): :func:`moesaic.config.load_settings`. A relative ``models`` in the
    file is relative to the file.

    Raises ``ValueError`` whose lines name the file, variable or credential, and the field.
    """

    def relative_to_file(data: dict[str, Any]) -> dict[str, Any]:
        if (
            path is not None
            and isinstance(data.get("models"), str)
            and not Path(data["models"]).is_absolute()
        ):
            data = {**data, "models": str(Path(path).parent / data["models"])}
        return data

    return load_settings(
        NodeConfig, path, role="node", env=env, overrides=overrides, prepare_file=relative_to_file
    )
