"""Configuration of ``moesaic dashboard``: where it listens, the broker it reads, what it polls.

A YAML file (``moesaic dashboard --config FILE``) with every field optional; the command's
flags override it::

    listen: 127.0.0.1:8321                  # loopback by default
    tls: {cert: dashboard.pem, key: dashboard.key}   # HTTPS (client_ca: mutual TLS)
    mqtt:                                   # the broker, as the bridge's settings name it
      broker: mqtts://broker.local:8883
      username: dashboard
      password_credential: mqtt-password    # read from $CREDENTIALS_DIRECTORY (systemd)
      tls: {ca_file: /etc/moesaic/ca.pem}
    coordinator: 127.0.0.1:8500             # its gRPC health is shown
    fleet: /etc/moesaic/fleet.yaml          # the coordinator's fleet config: the nodes to describe
    nodes: [{address: 10.0.0.11:8001, name: jetson-a}]
    metrics: [{name: coordinator, url: http://127.0.0.1:9101/metrics}]
    history_s: 300

Environment overrides: ``MOESAIC_DASHBOARD_<FIELD>``, nested with ``__``
(``MOESAIC_DASHBOARD_MQTT__BROKER``); ``MOESAIC_MQTT_USERNAME`` and ``MOESAIC_MQTT_PASSWORD`` are
aliases of ``MOESAIC_DASHBOARD_MQTT__USERNAME``/``__PASSWORD``, as for the bridge. Under systemd,
a credential named like a field (``mqtt__password``) sets it. Precedence and error format:
:func:`moesaic.config.load_settings`.

Until 0.2 the broker settings may still be written at the top level (``broker``, ``protocol``,
``username``, ``password``, ``password_credential``, and ``mqtt_tls`` for ``mqtt.tls``); they
are moved under ``mqtt:`` with a ``FutureWarning``.
"""

from __future__ import annotations

import ipaddress
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moesaic.config import load_settings
from moesaic.ingest.config import ENV_ALIASES, BrokerSettings, IngestConfig
from moesaic.rpc import TlsConfig

__all__ = [
    "DashboardConfig",
    "MetricsEndpoint",
    "NodeTarget",
    "load_dashboard_config",
    "parse_listen",
    "parse_metrics_endpoint",
    "parse_node_target",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_TOP_LEVEL_BROKER = {
    "broker": "broker",
    "protocol": "protocol",
    "username": "username",
    "password": "password",
    "password_credential": "password_credential",
    "mqtt_tls": "tls",
}
"""0.1's top-level broker keys and their names under ``mqtt:``."""


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` too) -> ``(host, port)``; ``ValueError`` naming the value.

    >>> parse_listen("127.0.0.1:8321")
    ('127.0.0.1', 8321)
    """
    host, sep, port = value.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT")
    return host, int(port)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class NodeTarget(_Strict):
    """A node whose ``Describe`` the dashboard polls."""

    address: str = Field(min_length=3, description="HOST:PORT of the node's gRPC server")
    name: str | None = Field(default=None, description="name shown (default: the node's Describe node_id)")
    tls: TlsConfig | None = Field(default=None, description="client TLS towards this node")


class MetricsEndpoint(_Strict):
    """A Prometheus ``/metrics`` endpoint of a component (node, coordinator, bridge)."""

    url: str = Field(description="http(s)://HOST:PORT/metrics")
    name: str | None = Field(default=None, description="name shown (default: HOST:PORT of the URL)")

    @field_validator("url")
    @classmethod
    def _http(cls, value: str) -> str:
        parts = urlsplit(value)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{value!r} is not an http(s):// URL")
        return value

    @property
    def label(self) -> str:
        return self.name or urlsplit(self.url).netloc


def _named(value: str) -> tuple[str | None, str]:
    """``NAME=REST`` -> ``(NAME, REST)``; a value with no name before ``=`` -> ``(None, value)``."""
    head, sep, rest = value.partition("=")
    if sep and head and not any(c in head for c in ":/?"):
        return head, rest
    return None, value


def parse_node_target(value: str) -> NodeTarget:
    """``[NAME=]HOST:PORT`` from the command line.

    >>> parse_node_target("edge-a=127.0.0.1:8001")
    NodeTarget(address='127.0.0.1:8001', name='edge-a', tls=None)
    """
    name, address = _named(value)
    return NodeTarget(address=address, name=name)


def parse_metrics_endpoint(value: str) -> MetricsEndpoint:
    """``[NAME=]URL`` from the command line; a bare ``HOST:PORT`` means ``http://HOST:PORT/metrics``.

    >>> parse_metrics_endpoint("coordinator=127.0.0.1:9101")
    MetricsEndpoint(url='http://127.0.0.1:9101/metrics', name='coordinator')
    """
    name, url = _named(value)
    if "://" not in url:
        url = f"http://{url}/metrics"
    return MetricsEndpoint(url=url, name=name)


class DashboardConfig(_Strict):
    """Everything the dashboard needs. Secrets may come from ``$CREDENTIALS_DIRECTORY``."""

    listen: str = Field(default="127.0.0.1:8321", description="HOST:PORT of the web server (loopback)")
    tls: TlsConfig | None = Field(
        default=None, description="HTTPS: cert + key (client_ca: clients must present a certificate)"
    )
    allowed_hosts: tuple[str, ...] = Field(
        default=(),
        description="Host header names accepted besides the listen host (and, on loopback, localhost); "
        "others are refused, which keeps DNS-rebinding pages out",
    )
    mqtt: BrokerSettings = Field(
        default_factory=BrokerSettings, description="the broker: address, protocol, credentials, TLS"
    )
    camera_frames: bool = Field(
        default=True, description="subscribe to camera frames to draw detections on them"
    )
    coordinator: str | None = Field(default=None, description="coordinator gRPC HOST:PORT (health shown)")
    coordinator_tls: TlsConfig | None = Field(default=None, description="client TLS to the coordinator")
    fleet: Path | None = Field(default=None, description="the coordinator's fleet YAML: nodes to describe")
    nodes: tuple[NodeTarget, ...] = Field(default=(), description="nodes to describe (besides the fleet's)")
    metrics: tuple[MetricsEndpoint, ...] = Field(default=(), description="Prometheus endpoints to scrape")
    history_s: float = Field(default=300.0, ge=10, le=3600, description="seconds of history in the charts")
    push_interval_s: float = Field(
        default=0.5, ge=0.1, le=5, description="updates to the pages are batched this often"
    )
    poll_interval_s: float = Field(
        default=2.0, ge=0.5, le=60, description="how often nodes, metrics and health are polled"
    )

    @field_validator("listen")
    @classmethod
    def _listen(cls, value: str) -> str:
        parse_listen(value)
        return value

    @model_validator(mode="before")
    @classmethod
    def _top_level_broker(cls, data: Any) -> Any:
        """The broker settings of 0.1, at the top level: moved under ``mqtt:``, with a warning."""
        if not isinstance(data, Mapping):
            return data
        old = [key for key in _TOP_LEVEL_BROKER if key in data]
        if not old:
            return data
        warnings.warn(
            f"dashboard config: {', '.join(old)} at the top level is deprecated (until 0.2); write "
            + ", ".join(f"mqtt.{_TOP_LEVEL_BROKER[key]}" for key in old),
            FutureWarning,
            stacklevel=2,
        )
        moved = {k: v for k, v in data.items() if k not in _TOP_LEVEL_BROKER}
        section = dict(data.get("mqtt") or {})
        for key in old:
            section.setdefault(_TOP_LEVEL_BROKER[key], data[key])
        moved["mqtt"] = section
        return moved

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def mqtt_config(self) -> IngestConfig:
        """The broker settings as the MQTT client wrapper takes them (a clean, non-persistent session)."""
        return IngestConfig.model_validate(
            {**self.mqtt.model_dump(), "component": "dashboard", "persistent_session": False}
        )


DASHBOARD_ENV_ALIASES = {alias: f"mqtt__{field}" for alias, field in ENV_ALIASES.items()}
"""``MOESAIC_MQTT_USERNAME``/``_PASSWORD`` name ``mqtt.username``/``mqtt.password`` here."""


def load_dashboard_config(
    path: Path | None = None, *, env: Mapping[str, str] | None = None, **overrides: object
) -> DashboardConfig:
    """The dashboard's settings: non-None ``overrides`` (CLI flags), ``MOESAIC_DASHBOARD_*``
    variables, ``$CREDENTIALS_DIRECTORY``, then ``path`` (YAML): :func:`moesaic.config.load_settings`.
    ``ValueError`` naming the source and field."""
    return load_settings(
        DashboardConfig,
        path,
        role="dashboard",
        env=env,
        overrides=overrides,
        env_aliases=DASHBOARD_ENV_ALIASES,
    )
