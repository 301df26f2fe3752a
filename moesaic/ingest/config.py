"""Configuration of the MQTT bridge: broker, coordinator, per-sensor tasks and budgets.

A YAML file (``moesaic ingest --config FILE``) with every field optional::

    broker: mqtts://broker.local:8883
    username: moesaic
    password_credential: mqtt-password     # read from $CREDENTIALS_DIRECTORY (systemd)
    tls: {ca_file: /etc/moesaic/ca.pem}
    coordinator: 127.0.0.1:50070
    group: fleet                           # MQTT 5 shared subscription
    defaults:
      lidar: {tasks: [bev_segmentation], budget: {latency_ms: 200}}
      camera: {tasks: [detection], budget: {latency_ms: 150, energy_mj: 5000}}
    sensors:
      roof: {lidar: {tasks: [bev_segmentation, bev_reconstruction]}}

Every field can be overridden from the environment as ``MOESAIC_INGEST_<FIELD>`` (nested with
``__``: ``MOESAIC_INGEST_TLS__CA_FILE``); ``MOESAIC_MQTT_USERNAME`` and ``MOESAIC_MQTT_PASSWORD``
are kept as aliases of ``MOESAIC_INGEST_USERNAME``/``_PASSWORD``. Under systemd, a credential
named like a field (``password``, ``coordinator_tls__key``) sets it. Precedence and error
format: :func:`moesaic.config.load_settings`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moesaic.budget import UNBOUNDED, Budget
from moesaic.config import CREDENTIALS_VARIABLE, load_settings
from moesaic.ingest.topics import SensorKind, validate_segment
from moesaic.rpc import TlsConfig

__all__ = [
    "ENV_ALIASES",
    "BrokerAddress",
    "BrokerSettings",
    "IngestConfig",
    "StreamConfig",
    "TlsOptions",
    "load_config",
    "parse_broker_url",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StreamConfig(_Strict):
    """What to request for the frames of one sensor kind."""

    tasks: tuple[str, ...] = Field(description="coordinator tasks requested for every frame")
    budget: Budget = Field(default=UNBOUNDED, description="used when a frame has none")
    options: dict[str, str] = Field(
        default_factory=dict, description="PerceiveRequest.options, e.g. slice: 640"
    )
    png: bool = Field(default=True, description="also publish grids as PNG on results/{sensor}/{task}/png")

    @field_validator("tasks")
    @classmethod
    def _tasks_are_topic_levels(cls, tasks: tuple[str, ...]) -> tuple[str, ...]:
        for task in tasks:
            validate_segment(task, "task")
        return tasks


class SensorConfig(_Strict):
    """Overrides for one sensor id; unset kinds use ``defaults``."""

    lidar: StreamConfig | None = None
    camera: StreamConfig | None = None


class Defaults(_Strict):
    lidar: StreamConfig = Field(
        default_factory=lambda: StreamConfig(tasks=("bev_segmentation",), budget=Budget(latency_ms=500))
    )
    camera: StreamConfig = Field(
        default_factory=lambda: StreamConfig(tasks=("detection",), budget=Budget(latency_ms=500))
    )


class TlsOptions(_Strict):
    """TLS to the broker. Present (even empty) means TLS with the system CAs."""

    ca_file: Path | None = Field(default=None, description="CA bundle that signed the broker's certificate")
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="client private key (mutual TLS)")
    insecure: bool = Field(default=False, description="skip hostname verification (testing only)")


class BrokerAddress(_Strict):
    host: str
    port: int
    tls: bool


def parse_broker_url(url: str) -> BrokerAddress:
    """``mqtt://HOST:PORT`` (default port 1883) or ``mqtts://HOST:PORT`` (8883); bare ``HOST:PORT`` too.

    >>> parse_broker_url("mqtts://broker:9000")
    BrokerAddress(host='broker', port=9000, tls=True)
    """
    if "://" not in url:
        url = "mqtt://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
        raise ValueError(f"broker {url!r}: scheme must be mqtt:// or mqtts://")
    if not parts.hostname:
        raise ValueError(f"broker {url!r}: no host")
    tls = parts.scheme in ("mqtts", "ssl")
    try:
        port = parts.port or (8883 if tls else 1883)
    except ValueError:
        raise ValueError(f"broker {url!r}: bad port") from None
    return BrokerAddress(host=parts.hostname, port=port, tls=tls)


class BrokerSettings(_Strict):
    """How to reach the MQTT broker: the bridge's and the dashboard's, one model.

    The password comes from, in order: the systemd credential named by ``password_credential``,
    then ``password`` (itself from the command line, ``MOESAIC_<ROLE>_PASSWORD`` or its alias
    ``MOESAIC_MQTT_PASSWORD``, a credential file named ``password``, or the YAML file).
    """

    broker: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto tries 5 and falls back to 3.1.1"
    )
    username: str | None = Field(default=None, description="broker user name")
    password: str | None = Field(default=None, description="broker password (prefer password_credential)")
    password_credential: str | None = Field(
        default=None, description="name of a systemd credential (LoadCredential=) holding the password"
    )
    tls: TlsOptions | None = Field(default=None, description="TLS options; mqtts:// turns TLS on too")

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @property
    def broker_address(self) -> BrokerAddress:
        return parse_broker_url(self.broker)

    def resolve_password(self) -> str | None:
        """The broker password: the systemd credential ``password_credential``, else ``password``."""
        if self.password_credential:
            directory = os.environ.get(CREDENTIALS_VARIABLE)
            if not directory:
                raise ValueError(
                    f"password_credential {self.password_credential!r} needs $CREDENTIALS_DIRECTORY "
                    "(run under systemd with LoadCredential=, or set MOESAIC_MQTT_PASSWORD)"
                )
            path = Path(directory) / self.password_credential
            try:
                return path.read_text().rstrip("\r\n")
            except OSError as exc:
                raise ValueError(f"cannot read credential {path}: {exc.strerror}") from None
        return self.password

    def resolve_username(self) -> str | None:
        return self.username


class IngestConfig(BrokerSettings):
    """Everything the bridge needs. Secrets may come from ``$CREDENTIALS_DIRECTORY``."""

    client_id: str | None = Field(
        default=None,
        description="MQTT client id; default moesaic-{component}-{host name} (stable, so a persistent "
        "session finds its queued frames after a restart)",
    )
    persistent_session: bool = Field(
        default=True,
        description="keep the broker session (subscriptions and QoS 1 frames queued for this bridge) "
        "across disconnects and bridge restarts",
    )
    session_expiry_s: int = Field(
        default=3600, ge=0, description="MQTT 5: how long the broker keeps the session of a gone bridge"
    )
    component: str = Field(default="ingest", description="name in moesaic/v1/status/{component}")
    group: str | None = Field(default=None, description="shared-subscription group ($share/GROUP/...)")
    sensors_filter: tuple[str, ...] = Field(default=(), description="only these sensor ids (default all)")
    coordinator: str = Field(default="127.0.0.1:8500", description="coordinator gRPC address HOST:PORT")
    coordinator_tls: TlsConfig | None = Field(
        default=None, description="client TLS towards the coordinator: {ca, cert, key, server_name}"
    )
    request_timeout_s: float = Field(default=10.0, gt=0, description="deadline of one Perceive call")
    max_in_flight: int = Field(default=8, ge=1, description="Perceive calls in flight across all sensors")
    queue_depth: int = Field(default=1, ge=1, description="frames kept per sensor stream (oldest dropped)")
    max_payload_bytes: int = Field(default=32 * 1024 * 1024, ge=1024, description="larger payloads rejected")
    max_image_pixels: int = Field(
        default=64_000_000,
        ge=1,
        description="camera images declaring more pixels are rejected from their header",
    )
    keepalive_s: int = Field(default=30, ge=5, description="MQTT keepalive")
    reconnect_min_s: float = Field(default=0.2, gt=0, description="first reconnect delay")
    reconnect_max_s: float = Field(default=10.0, gt=0, description="longest reconnect delay (backoff)")
    metrics_port: int | None = Field(default=None, description="serve Prometheus /metrics on this port")
    metrics_host: str = Field(default="127.0.0.1", description="address of the metrics endpoint")
    defaults: Defaults = Field(default_factory=Defaults, description="tasks and budgets per sensor kind")
    sensors: dict[str, SensorConfig] = Field(default_factory=dict, description="per-sensor overrides")

    @field_validator("component", "group")
    @classmethod
    def _topic_level(cls, value: str | None) -> str | None:
        return None if value is None else validate_segment(value, "component/group")

    def stream(self, sensor_id: str, kind: SensorKind) -> StreamConfig:
        """Tasks, budget and options for frames of ``sensor_id``'s ``kind``."""
        sensor = self.sensors.get(sensor_id)
        override = getattr(sensor, kind) if sensor else None
        return override or getattr(self.defaults, kind)


ENV_ALIASES = {"MOESAIC_MQTT_USERNAME": "username", "MOESAIC_MQTT_PASSWORD": "password"}
"""Documented names of the broker's credentials, for the bridge and the dashboard alike."""


def load_config(
    path: Path | None = None, *, env: Mapping[str, str] | None = None, **overrides: object
) -> IngestConfig:
    """The bridge's settings: non-None ``overrides`` (CLI flags), ``MOESAIC_INGEST_*`` variables
    (and :data:`ENV_ALIASES`), ``$CREDENTIALS_DIRECTORY``, then ``path`` (YAML):
    :func:`moesaic.config.load_settings`. ``ValueError`` naming the source and field."""
    return load_settings(
        IngestConfig, path, role="ingest", env=env, overrides=overrides, env_aliases=ENV_ALIASES
    )
