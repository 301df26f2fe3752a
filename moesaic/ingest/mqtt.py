"""aiomqtt client options from an :class:`IngestConfig`: address, credentials, TLS, protocol."""

from __future__ import annotations

import socket
import ssl
from typing import Any

import aiomqtt

from moesaic.ingest.config import IngestConfig

__all__ = ["connect_options"]


def connect_options(
    config: IngestConfig, *, client_id: str, protocol: aiomqtt.ProtocolVersion | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``aiomqtt.Client`` (everything but the will).

    TLS is on for ``mqtts://`` brokers and whenever ``tls:`` is configured; the password comes
    from the systemd credential, ``$MOESAIC_MQTT_PASSWORD`` or the config, in that order.
    """
    address = config.broker_address
    options: dict[str, Any] = {
        "hostname": address.host,
        "port": address.port,
        "identifier": client_id,
        "keepalive": config.keepalive_s,
        "timeout": 10.0,
        "protocol": protocol or aiomqtt.ProtocolVersion.V5,
        # paho leaves Nagle on: small results would wait for delayed ACKs (~40 ms)
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }
    username = config.resolve_username()
    if username is not None:
        options["username"] = username
        options["password"] = config.resolve_password()
    if address.tls or config.tls is not None:
        tls = config.tls
        options["tls_params"] = aiomqtt.TLSParameters(
            ca_certs=str(tls.ca_file) if tls and tls.ca_file else None,
            certfile=str(tls.cert_file) if tls and tls.cert_file else None,
            keyfile=str(tls.key_file) if tls and tls.key_file else None,
            cert_reqs=ssl.CERT_REQUIRED,
        )
        options["tls_insecure"] = bool(tls and tls.insecure)
    return options
