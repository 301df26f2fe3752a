"""rpc: the error tree -> gRPC status mapping, TLS config paths."""

from __future__ import annotations

import re
from pathlib import Path

import grpc
import pytest

from moesaic.errors import (
    MESSAGE_LIMIT,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    ResourceExhausted,
    Unavailable,
)
from moesaic.rpc import TlsConfig, status_of
from moesaic.runtime.engine import EngineError, MissingExtraError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (InvalidInput("input 'x': bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (NotFound("model 'm' not found"), grpc.StatusCode.NOT_FOUND),
        (EngineError("boom"), grpc.StatusCode.INTERNAL),
        (MissingExtraError("torch", "gpu"), grpc.StatusCode.INTERNAL),
        (Unavailable("model 'm' is loading"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhausted("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (DeadlineExceeded("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (Cancelled("gone"), grpc.StatusCode.CANCELLED),
    ],
)
def test_status_of_the_error_tree(exc: BaseException, code: grpc.StatusCode) -> None:
    got, message = status_of(exc)
    assert got == code and message == str(exc)


@pytest.mark.parametrize("exc", [ValueError("x"), LookupError("m"), KeyError("m"), ZeroDivisionError("x")])
def test_anything_else_is_internal_with_an_incident_id_and_no_details(
    exc: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    """A built-in exception escaping the core is a bug, not the client's fault."""
    try:
        raise exc
    except BaseException as raised:
        code, message = status_of(raised)
    assert code == grpc.StatusCode.INTERNAL
    incident = re.search(r"incident ([0-9a-f]{8})", message)
    assert incident and "Traceback" not in message and type(exc).__name__ not in message
    logged = [r for r in caplog.records if incident.group(1) in r.getMessage()]
    assert len(logged) == 1 and logged[0].exc_info is not None


def test_client_messages_are_clipped() -> None:
    _, message = status_of(InvalidInput("task: " + "x" * 20_000))
    assert len(message) <= MESSAGE_LIMIT and message.startswith("task: xxx") and "more characters" in message


def test_tls_paths_relative_to_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "node.pem").write_bytes(b"PEM")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    tls = TlsConfig(cert=Path("node.pem"), key=Path("node.key"))
    assert tls.read(tls.cert) == b"PEM"
    with pytest.raises(ValueError, match=r"tls: cannot read node\.key"):
        tls.read(tls.key)
    with pytest.raises(ValueError, match="cert and key must be given together"):
        TlsConfig(cert=Path("a"))
