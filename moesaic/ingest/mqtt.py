"""aiomqtt client options from an :class:`IngestConfig`: address, credentials, TLS, protocol."""

from __future__ import annotations

import socket
import ssl
from typing import Any

from moesaic.ingest.config import IngestConfig
from moesaic.runtime.engine import MissingExtraError

try:
    import aiomqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
except ImportError:
    raise MissingExtraError("aiomqtt", "ingest") from None

__all__ = ["connect_options"]


def connect_options(
    config: IngestConfig, *, client_id: str, protocol: aiomqtt.ProtocolVersion | None = None
) -> dict[str, Any]:
    """Keyword arguments for ``aiomqtt.Client`` (everything but the will).

    With ``persistent_session`` the session outlives the connection (MQTT 3.1.1
    ``clean_session=False``; MQTT 5 ``clean_start=False`` and ``session_expiry_s``), so frames
    published while the bridge is away wait at the broker for it.

    TLS is on for ``mqtts://`` brokers and whenever ``tls:`` is configured; the password comes
    from the systemd credential ``password_credential``, else ``password`` (which the settings
    loader fills from the command line, ``$MOESAIC_MQTT_PASSWORD``, a ``password`` credential or
    the config, in that order).
    """
    address = config.broker_address
    version = protocol or aiomqtt.ProtocolVersion.V5
    options: dict[str, Any] = {
        "hostname": address.host,
        "port": address.port,
        "identifier": client_id,
        "keepalive": config.keepalive_s,
        "timeout": 10.0,
        "protocol": version,
        # paho leaves Nagle on: small results would wait for delayed ACKs (~40 ms)
        "socket_options": ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),),
    }
    if config.persistent_session:  # the broker keeps subscriptions and queued QoS 1 frames
        if version == aiomqtt.ProtocolVersion.V5:
            properties = Properties(PacketTypes.CONNECT)
            properties.SessionExpiryInterval = config.session_expiry_s
            options.update(clean_start=False, properties=properties)
        else:
            options["clean_session"] = False
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
