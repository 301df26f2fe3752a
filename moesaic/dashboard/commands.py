"""``moesaic dashboard``: the live fleet page in a browser."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path
from typing import Any

__all__ = ["register", "run_dashboard"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``dashboard`` sub-command."""
    p = subparsers.add_parser(
        "dashboard",
        help="serve a live page of the fleet: nodes, decisions, budgets, BEV images and detections",
        description="Serve the fleet dashboard (default http://127.0.0.1:8321/), fed by the MQTT results, "
        "errors and status topics, node Describe and the components' metrics. Runs until SIGTERM.",
    )
    p.add_argument("--broker", help="mqtt://HOST:PORT or mqtts://HOST:PORT (default mqtt://127.0.0.1:1883)")
    p.add_argument("--listen", help="HOST:PORT to serve the page on (default 127.0.0.1:8321)")
    p.add_argument("--coordinator", help="coordinator gRPC HOST:PORT (its health is shown)")
    p.add_argument("--fleet", type=Path, help="the coordinator's fleet YAML: describe its nodes")
    p.add_argument(
        "--node",
        action="append",
        default=[],
        metavar="[NAME=]HOST:PORT",
        help="a node to describe (repeatable)",
    )
    p.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="[NAME=]URL",
        help="a Prometheus endpoint to scrape, e.g. coordinator=http://127.0.0.1:9101/metrics (repeatable)",
    )
    p.add_argument("--tls-cert", type=Path, help="serve HTTPS with this PEM certificate chain")
    p.add_argument("--tls-key", type=Path, help="the private key of --tls-cert")
    p.add_argument("--tls-client-ca", type=Path, help="require client certificates signed by this CA")
    p.add_argument(
        "--history", type=float, metavar="SECONDS", help="seconds shown in the charts (default 300)"
    )
    p.add_argument("--config", type=Path, help="dashboard config YAML (MQTT credentials and TLS, nodes, ...)")
    p.set_defaults(func=run_dashboard)


def run_dashboard(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic dashboard``."""
    from moesaic.dashboard.config import (
        load_dashboard_config,
        parse_metrics_endpoint,
        parse_node_target,
    )
    from moesaic.rpc import TlsConfig

    try:
        base = load_dashboard_config(args.config)
        tls = base.tls
        if args.tls_cert or args.tls_key or args.tls_client_ca:
            tls = TlsConfig.model_validate(
                {"cert": args.tls_cert, "key": args.tls_key, "client_ca": args.tls_client_ca}
            )
        config = load_dashboard_config(
            args.config,
            mqtt={"broker": args.broker},
            listen=args.listen,
            coordinator=args.coordinator,
            fleet=args.fleet,
            history_s=args.history,
            tls=tls,
            nodes=[n.model_dump() for n in base.nodes]
            + [parse_node_target(n).model_dump() for n in args.node],
            metrics=[m.model_dump() for m in base.metrics]
            + [parse_metrics_endpoint(m).model_dump() for m in args.metrics],
        )
        config.mqtt_config().resolve_password()
    except ValueError as exc:
        log.error("%s", exc)
        return 2
    try:
        return asyncio.run(_serve(config))
    except ImportError as exc:
        log.error("%s", exc)
        return 2
    except (ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1


async def _serve(config: Any) -> int:
    from moesaic.dashboard.server import Dashboard
    from moesaic.systemd import notify_ready, notify_stopping

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with Dashboard(config) as dashboard:
        print(f"dashboard: {dashboard.url}", flush=True)
        notify_ready(f"serving {dashboard.url}")
        await stop.wait()
        notify_stopping()
    return 0
