"""``moesaic node --models DIR --listen HOST:PORT [--config FILE] [--device SPEC]``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

__all__ = ["register", "run_node"]

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    """Add the ``node`` sub-command."""
    parser = subparsers.add_parser(
        "node",
        help="serve a model repository over gRPC (KServe v2 + moesaic.v1.Node)",
        description="Serve every model folder of DIR over gRPC until SIGTERM.",
    )
    parser.add_argument("--models", type=Path, help="model repository: one sub-folder per model")
    parser.add_argument("--listen", help="HOST:PORT to listen on (default 127.0.0.1:8001)")
    parser.add_argument("--config", type=Path, help="node config YAML (MOESAIC_NODE_* env vars override it)")
    parser.add_argument("--device", help="cpu, cuda:N, jetson or auto (default cpu)")
    parser.add_argument("--node-id", help="name of this node in the fleet (default: host name)")
    parser.add_argument("--metrics-port", type=int, help="serve Prometheus /metrics on this port")
    parser.add_argument(
        "--watch",
        action="store_const",
        const=True,
        default=None,
        help="poll the repository and swap in new or changed model versions without downtime "
        "(default: off; load and unload through the KServe repository API)",
    )
    parser.add_argument(
        "--watch-interval", type=float, metavar="SECONDS", help="how often --watch polls (default 2)"
    )
    parser.add_argument(
        "--allow-cpu-fallback",
        action="store_const",
        const=True,
        default=None,
        help="on a GPU or Jetson node, serve models that cannot use it on the CPU (default: refuse to start)",
    )
    parser.set_defaults(func=run_node)


def run_node(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic node``."""
    from moesaic.nodes.config import load_node_config
    from moesaic.nodes.server import NodeServer

    overrides = {
        "models": args.models,
        "listen": args.listen,
        "device": args.device,
        "node_id": args.node_id,
        "metrics_port": args.metrics_port,
        "allow_cpu_fallback": args.allow_cpu_fallback,
        "watch": args.watch,
        "watch_interval_s": args.watch_interval,
    }
    try:
        config = load_node_config(args.config, overrides=overrides)
        node = NodeServer(config)
    except (ValueError, LookupError) as exc:
        log.error("%s", exc)
        return 2
    return node.run()
