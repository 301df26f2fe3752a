"""``moesaic ingest`` (the MQTT bridge) and ``moesaic install-units`` (systemd unit files)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

__all__ = ["register", "run_ingest", "run_install_units"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``ingest`` and ``install-units`` sub-commands."""
    ingest = subparsers.add_parser(
        "ingest",
        help="bridge MQTT sensor topics to the coordinator and publish results",
        description="Subscribe to moesaic/v1/sensors/+/{lidar,camera}, call the coordinator for every "
        "frame and publish JSON on moesaic/v1/results/{sensor}/{task}. Runs until SIGTERM.",
    )
    ingest.add_argument(
        "--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default mqtt://127.0.0.1:1883)"
    )
    ingest.add_argument("--coordinator", help="coordinator gRPC HOST:PORT (default 127.0.0.1:8500)")
    ingest.add_argument(
        "--config", type=Path, help="ingest config YAML (tasks and budgets per sensor, TLS, ...)"
    )
    ingest.add_argument("--group", help="MQTT 5 shared-subscription group: replicas split the sensors")
    ingest.add_argument("--component", help="name in moesaic/v1/status/{component} (default ingest)")
    ingest.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    ingest.set_defaults(func=run_ingest)

    units = subparsers.add_parser(
        "install-units",
        help="write systemd unit files for nodes, the coordinator and the bridge",
        description="Write moesaic-node@.service, moesaic-coordinator.service and moesaic-ingest.service "
        "into --prefix (default /etc/systemd/system).",
    )
    units.add_argument(
        "--config", type=Path, help="units config YAML (executable, config_dir, user, credentials)"
    )
    units.add_argument(
        "--prefix", type=Path, default=Path("/etc/systemd/system"), help="directory to write into"
    )
    units.add_argument("--executable", type=Path, help="moesaic command the units run (default: this one)")
    units.add_argument("--config-dir", type=Path, help="where fleet.yaml, ingest.yaml and nodes/ live")
    units.add_argument("--user", help="run as this user instead of a DynamicUser")
    units.add_argument(
        "--ingest-config", type=Path, help="ingest.yaml whose password_credential gets a LoadCredential"
    )
    units.set_defaults(func=run_install_units)


def run_ingest(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic ingest``."""
    from moesaic.ingest.config import load_config

    try:
        config = load_config(
            args.config,
            broker=args.broker,
            coordinator=args.coordinator,
            group=args.group,
            component=args.component,
            metrics_port=args.metrics_port,
        )
        config.resolve_password()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    return asyncio.run(_serve(config))


async def _serve(config: Any) -> int:
    from moesaic.ingest.bridge import Bridge
    from moesaic.metrics import Metrics
    from moesaic.systemd import Watchdog, notify_ready, notify_status, notify_stopping

    metrics = Metrics(component="ingest")
    if config.metrics_port is not None:
        metrics.serve(config.metrics_port, host=config.metrics_host)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    async with Watchdog(), Bridge(config, metrics=metrics) as bridge:
        notify_status(f"connecting to {config.broker}")
        run = asyncio.create_task(bridge.run(), name="bridge")

        async def ready_when_connected() -> None:
            await bridge.connected.wait()
            notify_ready(f"bridging {config.broker} -> {config.coordinator}")

        ready = asyncio.create_task(ready_when_connected())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait([run, stopped], return_when=asyncio.FIRST_COMPLETED)
        notify_stopping()
        for task in (run, ready, stopped):
            task.cancel()
        for task in (run, ready, stopped):
            with contextlib.suppress(asyncio.CancelledError):
                await task
    log.info("bridge stopped: %s", bridge.stats)
    return 0


def run_install_units(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic install-units``."""
    from moesaic.ingest.config import load_config
    from moesaic.systemd.units import load_units_config, render_units, unreachable_paths

    executable = args.executable or _this_executable()
    try:
        config = load_units_config(
            args.config, executable=executable, config_dir=args.config_dir, user=args.user
        )
        if args.ingest_config is not None:
            ingest = load_config(args.ingest_config)
            if ingest.password_credential:
                credentials = {k: dict(v) for k, v in config.credentials.items()}
                credentials.setdefault("ingest", {}).setdefault(
                    ingest.password_credential, config.config_dir / "credentials" / ingest.password_credential
                )
                config = config.model_copy(update={"credentials": credentials})
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    args.prefix.mkdir(parents=True, exist_ok=True)
    for name, text in render_units(config).items():
        path = args.prefix / name
        path.write_text(text)
        print(f"wrote {path}")
    for warning in unreachable_paths(config):
        print(f"moesaic install-units: warning: {warning}", file=sys.stderr)
    print(
        "next: systemctl daemon-reload && "
        "systemctl enable --now moesaic-node@NAME moesaic-coordinator moesaic-ingest"
    )
    return 0


def _this_executable() -> Path | None:
    """The ``moesaic`` script beside this interpreter (a venv's bin/), else on PATH."""
    candidate = Path(sys.executable).parent / "moesaic"
    if candidate.exists():
        return candidate.absolute()
    found = shutil.which("moesaic")
    return Path(found).absolute() if found else None
