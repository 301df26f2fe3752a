"""rpc: domain error -> status mapping, TLS config paths."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from moesaic.rpc import ResourceExhaustedError, TlsConfig, UnavailableError, status_of
from moesaic.runtime.engine import EngineError, MissingExtraError


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (ValueError("input 'x': bad"), grpc.StatusCode.INVALID_ARGUMENT),
        (LookupError("model 'm' not found"), grpc.StatusCode.NOT_FOUND),
        (KeyError("m"), grpc.StatusCode.NOT_FOUND),
        (EngineError("boom"), grpc.StatusCode.INTERNAL),
        (MissingExtraError("torch", "gpu"), grpc.StatusCode.INTERNAL),
        (UnavailableError("model 'm' is loading"), grpc.StatusCode.UNAVAILABLE),
        (ResourceExhaustedError("too big"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (TimeoutError("late"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (ZeroDivisionError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_status_of(exc: BaseException, code: grpc.StatusCode) -> None:
    got, message = status_of(exc)
    assert got == code and message


def test_key_error_message_is_not_quoted() -> None:
    assert status_of(KeyError("model 'm' not found"))[1] == "model 'm' not found"


def test_tls_paths_relative_to_credentials_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "node.pem").write_bytes(b"PEM")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    tls = TlsConfig(cert=Path("node.pem"), key=Path("node.key"))
    assert tls.read(tls.cert) == b"PEM"
    with pytest.raises(ValueError, match=r"tls: cannot read node\.key"):
        tls.read(tls.key)
    with pytest.raises(ValueError, match="cert and key must be given together"):
        TlsConfig(cert=Path("a"))
