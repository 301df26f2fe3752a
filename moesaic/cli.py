"""The ``moesaic`` command. Each area of the package contributes its sub-commands.

Every module in ``_COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-commands with ``set_defaults(func=...)``; ``func(args)`` returns the exit status. A
module may also expose ``register_train(train_subparsers)`` to add ``moesaic train NAME``.
Modules are imported here, but each keeps its heavy imports inside its command functions,
so ``moesaic --help`` stays fast.

Every sub-command's help ends with an example (``EXAMPLES``) and shows each option's default;
a mistyped command, choice or option gets the nearest valid one suggested::

    $ moesaic nod
    moesaic: error: unknown command 'nod'; did you mean 'node'? (moesaic --help lists every command)
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn

from moesaic import __version__

_COMMAND_MODULES = (
    "moesaic.nodes.commands",
    "moesaic.nodes.profiling",
    "moesaic.nodes.importing",
    "moesaic.runtime.commands",
    "moesaic.coordinator.commands",
    "moesaic.ingest.commands",
    "moesaic.models.ppn.commands",
    "moesaic.models.detector.commands",
    "moesaic.models.florence2.commands",
    "moesaic.dashboard.commands",
    "moesaic.demo",
)


EXAMPLES: dict[str, str] = {
    "train": "moesaic train detector --data /tmp/moesaic-images --epochs 5",
    "train ppn": "moesaic generate-lidar --out /tmp/moesaic-lidar --frames 40\n"
    "moesaic train ppn --data /tmp/moesaic-lidar --task seg --steps 100 --out /tmp/ppn-seg",
    "train detector": "moesaic generate-images --out /tmp/moesaic-images --count 60\n"
    "moesaic train detector --data /tmp/moesaic-images --epochs 5 --export /tmp/my-yolo",
    "train florence2-lora": "moesaic florence2 build-tiny --out /tmp/florence2-tiny\n"
    "moesaic train florence2-lora --model /tmp/florence2-tiny --data /tmp/moesaic-images "
    "--out /tmp/florence2-lora --steps 20",
    "node": "moesaic node --models models --listen 127.0.0.1:8001 --watch",
    "profile": "moesaic profile --models models --model yolo-n --runs 20 --out /tmp/profile.json",
    "import-model": "moesaic import-model runs/detect/train/weights/best.pt --repo models --name my-yolo\n"
    "moesaic import-model my-detector.onnx --repo models --task detection --class-names car,person",
    "build-engine": "moesaic build-engine models/yolo-n/model.onnx --out models/yolo-n/model.plan --fp16",
    "coordinator": "moesaic coordinator --config fleet.yaml --listen 127.0.0.1:8500",
    "select": "moesaic select --problem examples/select-problem.json --latency-ms 30",
    "build-validation": "moesaic build-validation --config fleet.yaml --task detection "
    "--data frames/ --out detection.npz",
    "train-gate": "moesaic train-gate --table detection.npz --out gates/detection.json",
    "ingest": "moesaic ingest --broker mqtt://127.0.0.1:1883 --coordinator 127.0.0.1:8500",
    "install-units": "moesaic install-units --prefix /tmp/units --config-dir /etc/moesaic",
    "bev": "moesaic bev moesaic/assets/sample_lidar/velodyne/000000.bin --out /tmp/bev.png",
    "generate-lidar": "moesaic generate-lidar --out /tmp/moesaic-lidar --frames 40",
    "detect": "moesaic detect --model models/yolo-n --image frame.jpg --out /tmp/detections",
    "generate-images": "moesaic generate-images --out /tmp/moesaic-images --count 60",
    "florence2": "moesaic florence2 build-tiny --out /tmp/florence2-tiny",
    "florence2 run": "moesaic florence2 run --model /tmp/florence2-tiny --image frame.jpg --prompt '<OD>'",
    "florence2 build-tiny": "moesaic florence2 build-tiny --out /tmp/florence2-tiny",
    "dashboard": "moesaic dashboard --broker mqtt://127.0.0.1:1883 --fleet fleet.yaml",
    "demo": "moesaic demo --duration 60",
}
"""One runnable example per sub-command (``moesaic`` dropped from the key), shown in its help."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, keeping the example epilog's lines as written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("example"):
            return "\n".join(indent + line for line in text.splitlines())
        return super()._fill_text(text, width, indent)


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors suggest the nearest command, choice or option."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"{self.prog}: error: {suggest(self, message)}\n")


def suggest(parser: argparse.ArgumentParser, message: str) -> str:
    """``message`` with the nearest valid command, choice or option added (difflib)."""
    choice = re.search(r"argument (\S+): invalid choice: '([^']*)' \(choose from (.*)\)", message)
    if choice is not None:
        name, typo, listed = choice.groups()
        valid = re.findall(r"'([^']*)'", listed)
        near = difflib.get_close_matches(typo, valid, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else f"; one of {', '.join(valid)}"
        if name in ("COMMAND", "MODEL", "ACTION"):
            return f"unknown command {typo!r}{hint} ({parser.prog} --help lists every command)"
        return f"argument {name}: invalid choice {typo!r}{hint}"
    unknown = re.match(r"unrecognized arguments: (.*)", message)
    if unknown is not None:
        options = [o for a in parser._actions for o in a.option_strings]
        parts = []
        for arg in unknown.group(1).split():
            flag = arg.split("=", 1)[0]
            near = difflib.get_close_matches(flag, options, n=1, cutoff=0.6) if flag.startswith("-") else []
            parts.append(f"{arg!r}" + (f" (did you mean {near[0]}?)" if near else ""))
        return f"unrecognized arguments: {', '.join(parts)}; see {parser.prog} --help"
    return message


def _sub_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> Iterator[tuple[str, Any]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield " ".join((*path, name)), sub
                yield from _sub_parsers(sub, (*path, name))


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Append ``(default: X)`` to every option whose default says something and whose help
    does not name it already."""
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS:
            continue
        if action.default in (None, False, argparse.SUPPRESS) or isinstance(action, argparse._HelpAction):
            continue
        text = action.help or ""
        if "default" not in text.lower():
            action.help = f"{text} (default: %(default)s)".strip()


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="moesaic",
        description="moesaic: collaborative perception for edge fleets (nodes, coordinator, MQTT bridge).",
        epilog="example:\n  moesaic node --models models --listen 127.0.0.1:8001\n  moesaic demo",
    )
    parser.add_argument("--version", action="version", version=f"moesaic {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level (default: INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    train = sub.add_parser("train", help="train a model family on local data")
    train_sub = train.add_subparsers(dest="train_command", metavar="MODEL", parser_class=Parser)
    for name in _COMMAND_MODULES:
        module = importlib.import_module(name)
        if hasattr(module, "register"):
            module.register(sub)
        if hasattr(module, "register_train"):
            module.register_train(train_sub)
    for path, subparser in _sub_parsers(parser):
        _show_defaults(subparser)
        example = EXAMPLES.get(path)
        if example and not subparser.epilog:
            subparser.epilog = "example:\n" + "\n".join(f"  {line}" for line in example.splitlines())
        subparser.set_defaults(_parser=subparser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        getattr(args, "_parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "func", None):
        (getattr(args, "_parser", None) or parser).print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except BrokenPipeError:  # `moesaic ... | head`: the reader left; no traceback, as cat or grep
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python's own flush at exit must not fail again
        return 141
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
    except ImportError as exc:  # a role's package not installed: name the extra, no traceback
        from moesaic.runtime.engine import MissingExtraError

        if not isinstance(exc, MissingExtraError):
            raise
        print(f"{parser.prog}: {exc}", file=sys.stderr)
        return 1
