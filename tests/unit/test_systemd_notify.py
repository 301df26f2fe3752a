"""moesaic.systemd: the sd_notify protocol against a real unix datagram socket."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from moesaic import systemd


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    try:
        yield sock
    finally:
        sock.close()


def test_without_notify_socket_every_call_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify_ready() is False
    assert systemd.notify_stopping() is False
    assert systemd.notify_status("x") is False


@pytest.mark.parametrize(
    ("call", "expected"),
    [
        (lambda: systemd.notify_ready(), b"READY=1"),
        (lambda: systemd.notify_ready("serving 2 models"), b"READY=1\nSTATUS=serving 2 models"),
        (lambda: systemd.notify_stopping(), b"STOPPING=1"),
        (lambda: systemd.notify_status("loading"), b"STATUS=loading"),
    ],
)
def test_messages_reach_the_socket(notify_socket: socket.socket, call, expected: bytes) -> None:
    assert call() is True
    assert notify_socket.recv(4096) == expected


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"moesaic-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(2)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert systemd.notify_ready()
        assert sock.recv(64) == b"READY=1"


def test_unreachable_socket_returns_false(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert systemd.notify_ready() is False


@pytest.mark.parametrize(
    ("usec", "pid", "expected"),
    [
        (None, None, None),
        ("2000000", None, 1.0),
        ("2000000", "self", 1.0),
        ("2000000", "1", None),  # meant for another process
        ("abc", None, None),
        ("1", None, 0.01),  # never a busy loop
    ],
)
def test_watchdog_interval(monkeypatch: pytest.MonkeyPatch, usec, pid, expected) -> None:
    for name, value in (
        ("WATCHDOG_USEC", usec),
        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid),
    ):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


async def test_watchdog_pings_from_the_loop_and_stops_on_exit(notify_socket: socket.socket) -> None:
    notify_socket.setblocking(False)
    async with systemd.Watchdog(interval=0.05):
        await asyncio.sleep(0.22)
    pings = []
    while True:
        try:
            pings.append(notify_socket.recv(64))
        except BlockingIOError:
            break
    assert 3 <= len(pings) <= 6 and set(pings) == {b"WATCHDOG=1"}
    await asyncio.sleep(0.15)
    with pytest.raises(BlockingIOError):
        notify_socket.recv(64)


async def test_watchdog_off_without_interval(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    async with systemd.Watchdog() as dog:
        assert dog.interval is None
