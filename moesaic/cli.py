"""The ``moesaic`` command. Each area of the package contributes its sub-commands.

Every module in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-commands with ``set_defaults(func=...)``; ``func(args)`` returns the exit status. A
module may also expose ``register_train(train_subparsers)`` to add ``moesaic train NAME``.
Modules are imported here, but each keeps its heavy imports inside its command functions,
so ``moesaic --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from moesaic import __version__

_COMMAND_MODULES = (
    "moesaic.nodes.commands",
    "moesaic.nodes.profiling",
    "moesaic.runtime.commands",
    "moesaic.coordinator.commands",
    "moesaic.ingest.commands",
    "moesaic.models.ppn.commands",
    "moesaic.models.detector.commands",
    "moesaic.models.florence2.commands",
    "moesaic.dashboard.commands",
    "moesaic.demo",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moesaic",
        description="moesaic: collaborative perception for edge fleets (nodes, coordinator, MQTT bridge).",
    )
    parser.add_argument("--version", action="version", version=f"moesaic {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    train = sub.add_parser("train", help="train a model family on local data")
    train_sub = train.add_subparsers(dest="train_command", metavar="MODEL")
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
        if hasattr(module, "register_train"):
            module.register_train(train_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
