"""gRPC plumbing shared by the node, the coordinator and the MQTT bridge.

One place for: TLS settings (:class:`TlsConfig`), server and channel creation with message
size limits, health + reflection on every server, and the mapping of domain errors to gRPC
status codes (:func:`status_of`)::

    server = create_server(max_message_bytes=64 << 20)
    health = add_health_and_reflection(server, [NODE_SERVICE])
    port = add_port(server, "127.0.0.1:0", tls=None)
    server.start()

    async with create_channel("127.0.0.1:8001", tls=TlsConfig(ca="ca.pem")) as channel:
        ...

Domain code raises the errors of :mod:`moesaic.errors`; only gRPC adapters turn them into
status codes, through :func:`status_of` / :func:`abort` / :func:`abort_async`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moesaic.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
    as_moesaic_error,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_BYTES",
    "HEALTH_SERVICE",
    "TlsConfig",
    "abort",
    "abort_async",
    "add_health_and_reflection",
    "add_port",
    "channel_credentials",
    "channel_options",
    "create_channel",
    "create_server",
    "server_credentials",
    "status_of",
]

DEFAULT_MAX_MESSAGE_BYTES = 64 << 20
HEALTH_SERVICE = "grpc.health.v1.Health"


class TlsConfig(BaseModel):
    """TLS settings of a server or a client. Paths may be relative to ``$CREDENTIALS_DIRECTORY``.

    Server: ``cert`` + ``key``; adding ``client_ca`` requires and verifies client certificates
    (mutual TLS). Client: ``ca`` (trust root; system roots when absent), optional ``cert`` +
    ``key`` for mutual TLS, optional ``server_name`` to override the name checked against the
    server's certificate.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    cert: Path | None = Field(None, description="PEM certificate chain of this side.")
    key: Path | None = Field(None, description="PEM private key of `cert`.")
    client_ca: Path | None = Field(
        None, description="Server: PEM CA bundle; clients must present a cert it signed."
    )
    ca: Path | None = Field(None, description="Client: PEM CA bundle that signed the server's certificate.")
    server_name: str | None = Field(None, description="Client: expected server name (overrides the host).")

    @model_validator(mode="after")
    def _pair(self) -> TlsConfig:
        if (self.cert is None) != (self.key is None):
            raise ValueError("tls: cert and key must be given together")
        return self

    def read(self, path: Path | None) -> bytes | None:
        """Bytes of ``path``; a relative path is looked up in ``$CREDENTIALS_DIRECTORY`` first."""
        if path is None:
            return None
        creds = os.environ.get("CREDENTIALS_DIRECTORY")
        if not path.is_absolute() and creds and (Path(creds) / path).exists():
            path = Path(creds) / path
        try:
            return path.read_bytes()
        except OSError as exc:
            raise ValueError(f"tls: cannot read {path}: {exc.strerror}") from None


def server_credentials(tls: TlsConfig) -> grpc.ServerCredentials:
    """Server credentials; mutual TLS when ``tls.client_ca`` is set."""
    if tls.cert is None or tls.key is None:
        raise ValueError("tls: a server needs cert and key")
    pair = [(tls.read(tls.key), tls.read(tls.cert))]
    client_ca = tls.read(tls.client_ca)
    return grpc.ssl_server_credentials(
        pair, root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def channel_credentials(tls: TlsConfig) -> grpc.ChannelCredentials:
    """Client credentials: trust ``tls.ca`` (or system roots), present ``cert``/``key`` if given."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.read(tls.ca),
        private_key=tls.read(tls.key),
        certificate_chain=tls.read(tls.cert),
    )


def channel_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, Any]]:
    """Options shared by servers and channels: message size limits, keepalive."""
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ]


def create_server(
    *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES, max_workers: int = 16, aio: bool = False
) -> Any:
    """A ``grpc.Server`` (thread pool; ``aio=False``) or ``grpc.aio.Server``, size-limited.

    Over-size requests are refused by gRPC itself with RESOURCE_EXHAUSTED.
    """
    options = channel_options(max_message_bytes)
    if aio:
        return grpc.aio.server(options=options)
    return grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="grpc"),
        options=options,
        maximum_concurrent_rpcs=None,
    )


def add_port(server: Any, address: str, tls: TlsConfig | None = None) -> int:
    """Bind ``address`` (``host:port``; port 0 picks a free one); returns the bound port."""
    port: int = (
        server.add_secure_port(address, server_credentials(tls)) if tls else server.add_insecure_port(address)
    )
    if port == 0:
        raise OSError(f"cannot listen on {address}")
    return port


def add_health_and_reflection(server: Any, service_names: Iterable[str]) -> Any:
    """Serve ``grpc.health.v1`` (Check, Watch) and reflection for ``service_names``.

    Returns the health servicer: for a thread-pool server a ``grpc_health.v1.health.HealthServicer``
    (``set(name, status)`` is synchronous), for a ``grpc.aio`` server the aio servicer
    (``await set(...)``). Every named service and the overall ``""`` start NOT_SERVING; set them
    SERVING once ready.
    """
    names = list(service_names)
    is_aio = isinstance(server, grpc.aio.Server)
    servicer: Any
    not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
    if is_aio:
        servicer = health.aio.HealthServicer()
        for name in ["", *names]:
            servicer._server_status[name] = not_serving  # no await needed before start
    else:
        servicer = health.HealthServicer(experimental_non_blocking=True)
        for name in ["", *names]:
            servicer.set(name, not_serving)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    reflection.enable_server_reflection([*names, HEALTH_SERVICE, reflection.SERVICE_NAME], server)
    return servicer


def create_channel(
    address: str,
    *,
    tls: TlsConfig | None = None,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    aio: bool = True,
) -> Any:
    """A ``grpc.aio.Channel`` (default) or a blocking ``grpc.Channel`` to ``address``."""
    options = channel_options(max_message_bytes)
    if tls and tls.server_name:
        options.append(("grpc.ssl_target_name_override", tls.server_name))
    module: Any = grpc.aio if aio else grpc
    if tls is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, channel_credentials(tls), options=options)


_STATUS: Mapping[str, grpc.StatusCode] = {
    InvalidInput.code: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound.code: grpc.StatusCode.NOT_FOUND,
    Unavailable.code: grpc.StatusCode.UNAVAILABLE,
    DeadlineExceeded.code: grpc.StatusCode.DEADLINE_EXCEEDED,
    ResourceExhausted.code: grpc.StatusCode.RESOURCE_EXHAUSTED,
    Cancelled.code: grpc.StatusCode.CANCELLED,
    Internal.code: grpc.StatusCode.INTERNAL,
    FailedPrecondition.code: grpc.StatusCode.FAILED_PRECONDITION,
}


def status_of(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The gRPC status code and message of ``exc``: the one place errors become statuses.

    An exception outside :mod:`moesaic.errors` is a bug: INTERNAL, with an incident id in the
    message and its traceback logged once (by :func:`~moesaic.errors.as_moesaic_error`).
    """
    err = as_moesaic_error(exc)
    return _STATUS[err.code], err.message


def abort(context: grpc.ServicerContext, exc: BaseException) -> NoReturn:
    """End a thread-pool servicer call with the status of ``exc``."""
    code, message = status_of(exc)
    context.abort(code, message)
    raise AssertionError("unreachable")  # context.abort raises


async def abort_async(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> NoReturn:
    """End a ``grpc.aio`` servicer call with the status of ``exc``."""
    code, message = status_of(exc)
    await context.abort(code, message)
    raise AssertionError("unreachable")
