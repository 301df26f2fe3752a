"""Configuration of ``moesaic dashboard``: where it listens, the broker it reads, what it polls.

A YAML file (``moesaic dashboard --config FILE``) with every field optional; the command's
flags override it::

    listen: 127.0.0.1:8321                  # loopback by default
    tls: {cert: dashboard.pem, key: dashboard.key}   # HTTPS (client_ca: mutual TLS)
    broker: mqtts://broker.local:8883
    username: dashboard
    password_credential: mqtt-password      # read from $CREDENTIALS_DIRECTORY (systemd)
    mqtt_tls: {ca_file: /etc/moesaic/ca.pem}
    coordinator: 127.0.0.1:8500             # its gRPC health is shown
    fleet: /etc/moesaic/fleet.yaml          # the coordinator's fleet config: the nodes to describe
    nodes: [{address: 10.0.0.11:8001, name: jetson-a}]
    metrics: [{name: coordinator, url: http://127.0.0.1:9101/metrics}]
    history_s: 300

Environment overrides (as for the bridge): ``MOESAIC_MQTT_USERNAME``, ``MOESAIC_MQTT_PASSWORD``.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, field_validator

from moesaic.config import load_model
from moesaic.ingest.config import IngestConfig, TlsOptions, parse_broker_url
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
    broker: str = Field(default="mqtt://127.0.0.1:1883", description="mqtt://HOST:PORT or mqtts://HOST:PORT")
    protocol: Literal["auto", "5", "3.1.1"] = Field(
        default="auto", description="MQTT version; auto tries 5 and falls back to 3.1.1"
    )
    username: str | None = Field(default=None, description="broker user name")
    password: str | None = Field(default=None, description="broker password (prefer password_credential)")
    password_credential: str | None = Field(
        default=None, description="name of a systemd credential (LoadCredential=) holding the password"
    )
    mqtt_tls: TlsOptions | None = Field(default=None, description="TLS to the broker; mqtts:// turns it on")
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

    @field_validator("broker")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        parse_broker_url(value)
        return value

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def mqtt_config(self) -> IngestConfig:
        """The broker settings as the MQTT client wrapper takes them (a clean, non-persistent session)."""
        return IngestConfig(
            broker=self.broker,
            protocol=self.protocol,
            username=self.username,
            password=self.password,
            password_credential=self.password_credential,
            tls=self.mqtt_tls,
            component="dashboard",
            persistent_session=False,
        )


def load_dashboard_config(path: Path | None = None, **overrides: object) -> DashboardConfig:
    """Read ``path`` (YAML) and apply non-None ``overrides``; ``ValueError`` naming file and field."""
    return load_model(DashboardConfig, path, what="dashboard config", **overrides)
