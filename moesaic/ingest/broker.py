"""Brokers moesaic can start itself: an embedded amqtt broker and a local mosquitto process.

The demo runs :class:`EmbeddedBroker` (pure Python, MQTT 3.1.1) unless it is given a broker;
tests and benchmarks run :class:`MosquittoProcess` (Debian's ``mosquitto``, MQTT 5).

>>> async def demo():
...     async with EmbeddedBroker(port=0) as broker:
...         print(broker.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from moesaic.fleet.ready import free_port
from moesaic.runtime.engine import MissingExtraError

__all__ = ["EmbeddedBroker", "MosquittoProcess", "mosquitto_binary", "wait_for_port"]

log = logging.getLogger(__name__)


def wait_for_port(host: str, port: int, timeout: float) -> bool:
    """True once ``host:port`` accepts TCP connections, False after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return True
        time.sleep(0.02)
    return False


def mosquitto_binary() -> str | None:
    """Path of the mosquitto broker binary (Debian puts it in /usr/sbin), or None."""
    found = shutil.which("mosquitto")
    if found:
        return found
    return "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None


class EmbeddedBroker:
    """An amqtt broker on ``host:port`` inside the running event loop (anonymous, MQTT 3.1.1)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 1883) -> None:
        self.host = host
        self.port = port or free_port(host)
        self._broker: Any = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    async def __aenter__(self) -> EmbeddedBroker:
        try:
            from amqtt.broker import Broker
        except ImportError:
            raise MissingExtraError("amqtt", "demo") from None

        for name in ("amqtt", "transitions"):
            logging.getLogger(name).setLevel(logging.WARNING)
        config = {
            "listeners": {
                "default": {"type": "tcp", "bind": f"{self.host}:{self.port}", "max_connections": 64}
            },
            "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
        }
        self._broker = Broker(config)
        await asyncio.wait_for(self._broker.start(), timeout=10)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._broker is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._broker.shutdown(), timeout=5)
            self._broker = None


class MosquittoProcess:
    """A mosquitto process on a loopback port with a generated config; restartable on that port.

    >>> with MosquittoProcess(Path("/tmp/mq")) as broker:   # doctest: +SKIP
    ...     print(broker.url)
    """

    def __init__(
        self,
        directory: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        persistent: bool = False,
        extra_config: str = "",
    ) -> None:
        """``persistent``: keep sessions and queued messages in ``directory/store`` across restarts."""
        binary = mosquitto_binary()
        if binary is None:
            raise FileNotFoundError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        self.binary = binary
        self.host = host
        self.port = port or free_port(host)
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "mosquitto.conf"
        persistence = "persistence false\n"
        if persistent:
            store = directory / "store"
            store.mkdir(exist_ok=True)
            # As root, mosquitto would switch to its own user, which cannot reach a private temp
            # folder: a broker the project starts for itself stays the user that started it.
            user = "user root\n" if os.geteuid() == 0 else ""
            persistence = f"persistence true\npersistence_location {store}/\n{user}"
        self.config.write_text(
            f"listener {self.port} {host}\nallow_anonymous true\n{persistence}"
            f"set_tcp_nodelay true\nlog_dest stderr\nlog_type error\nlog_type warning\n{extra_config}"
        )
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 10.0) -> None:
        """Start mosquitto and wait until its port accepts connections."""
        self.process = subprocess.Popen(
            [self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"mosquitto exited with status {self.process.returncode} (config {self.config})"
                )
            if wait_for_port(self.host, self.port, 0.1):
                return
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on {self.host}:{self.port} within {timeout}s")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 5 s."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def kill(self) -> None:
        """SIGKILL: clients lose the connection without a DISCONNECT (their wills fire)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None

    def __enter__(self) -> MosquittoProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """``python -m moesaic.ingest.broker --port N``: an embedded broker until SIGTERM/SIGINT."""
    import argparse
    import signal

    parser = argparse.ArgumentParser(prog="python -m moesaic.ingest.broker", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=1883)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        async with EmbeddedBroker(args.host, args.port):
            await stop.wait()

    asyncio.run(serve())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
