"""Services under a fake systemd: READY and WATCHDOG over $NOTIFY_SOCKET, STOPPING, last will."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiomqtt
import pytest

from moesaic.fleet import free_port
from tests.helpers.onnx_models import write_add_model

pytestmark = pytest.mark.timeout(60)


class NotifySocket:
    """The unix datagram socket systemd would listen on; collects what services send."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(line in m.splitlines() for m in self.messages):
                return self.messages
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"service exited with {proc.returncode} before sending {line}")
            self.sock.settimeout(0.2)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                continue
        raise AssertionError(f"no {line} within {timeout} s; got {self.messages}")

    def collect(self, seconds: float) -> None:
        """Receive whatever arrives during ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                break

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    sock = NotifySocket(tmp_path / "notify.sock")
    yield sock
    sock.close()


def service(args: list[str], notify: NotifySocket, tmp_path: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "NOTIFY_SOCKET": str(notify.path),
        "WATCHDOG_USEC": "200000",
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WATCHDOG_PID", None)
    log = (tmp_path / "service.log").open("wb")
    return subprocess.Popen(
        [sys.executable, "-m", "moesaic", *args], env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path
    )


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def test_node_sends_ready_after_loading_then_watchdog_then_stopping(
    tmp_path: Path, notify: NotifySocket
) -> None:
    repo = tmp_path / "models"
    write_add_model(repo, "add", model_yaml="task: test\n")
    proc = service(["node", "--models", str(repo), "--listen", f"127.0.0.1:{free_port()}"], notify, tmp_path)
    try:
        notify.wait_for("READY=1", 30, proc)
        ready_at = next(i for i, m in enumerate(notify.messages) if "READY=1" in m.splitlines())
        notify.wait_for("WATCHDOG=1", 5, proc)
        before = len(notify.messages)
        notify.collect(0.6)  # pings every 0.1 s (half of WATCHDOG_USEC)
        assert notify.messages[before:].count("WATCHDOG=1") >= 3
    finally:
        status = stop(proc)
    notify.wait_for("STOPPING=1", 5)
    assert status == 0
    assert "serving 1 model" in notify.messages[ready_at]
    log = (tmp_path / "service.log").read_text()
    assert "Traceback" not in log


@pytest.mark.mqtt
def test_ingest_ready_once_connected_offline_on_stop_and_last_will_on_kill(
    tmp_path: Path, notify: NotifySocket, mosquitto
) -> None:
    args = ["ingest", "--broker", mosquitto.url, "--coordinator", "127.0.0.1:1", "--component", "ingest-t"]
    proc = service(args, notify, tmp_path)
    try:
        notify.wait_for("READY=1", 20, proc)
        notify.wait_for("WATCHDOG=1", 5, proc)
        assert asyncio.run(retained_status(mosquitto.port, "ingest-t")) == b"online"
    finally:
        assert stop(proc) == 0
    notify.wait_for("STOPPING=1", 5)
    assert asyncio.run(retained_status(mosquitto.port, "ingest-t")) == b"offline"

    # killed without a goodbye: the broker publishes the last will
    proc = service(args, notify, tmp_path)
    notify.messages.clear()
    notify.wait_for("READY=1", 20, proc)
    assert asyncio.run(retained_status(mosquitto.port, "ingest-t")) == b"online"
    proc.kill()
    proc.wait()
    assert asyncio.run(retained_status(mosquitto.port, "ingest-t", expect=b"offline")) == b"offline"


def test_ingest_rejects_a_bad_config_naming_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "ingest.yaml"
    bad.write_text(json.dumps({"queue_depth": 0}))
    result = subprocess.run(
        [sys.executable, "-m", "moesaic", "ingest", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert str(bad) in result.stderr and "queue_depth" in result.stderr


async def retained_status(
    port: int, component: str, expect: bytes | None = None, timeout: float = 10.0
) -> bytes:
    """The retained payload of moesaic/v1/status/{component} (waiting for ``expect`` if given)."""
    deadline = time.monotonic() + timeout
    while True:
        async with aiomqtt.Client("127.0.0.1", port) as client:
            await client.subscribe(f"moesaic/v1/status/{component}", qos=1)
            async with asyncio.timeout(5):
                async for message in client.messages:
                    payload = bytes(message.payload)  # type: ignore[arg-type]
                    break
        if expect is None or payload == expect or time.monotonic() > deadline:
            return payload
        await asyncio.sleep(0.2)
