"""``moesaic demo``: the whole system on this machine, end to end, in about a minute.

Starts, as one process tree: an embedded MQTT broker (unless ``--broker``), two or three
nodes with different thread counts serving the experts in ``models/``, the coordinator and
the MQTT bridge. Replays the bundled LiDAR and camera samples through MQTT at sensor rate,
each frame with its own budget, shows a live table, prints a summary, and writes
``summary.json`` and an HTML report (BEV segmentation images, detection overlays). Every
child is stopped on exit, on Ctrl-C and on SIGTERM.

Modules: :mod:`~moesaic.demo.fleet` (experts, nodes, config files),
:mod:`~moesaic.demo.processes` (the process tree), :mod:`~moesaic.demo.replay` (MQTT
publishers and results subscriber), :mod:`~moesaic.demo.summary` (the figures),
:mod:`~moesaic.demo.report` (tables and HTML), :mod:`~moesaic.demo.run` (one run).
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moesaic.runtime.engine import MissingExtraError

__all__ = ["missing_extra", "register", "run_demo"]


def register(subparsers: Any) -> None:
    """Add the ``demo`` sub-command."""
    p = subparsers.add_parser(
        "demo",
        help="run nodes, coordinator, bridge and broker here and replay the bundled samples",
        description=__doc__.splitlines()[0] if __doc__ else None,
    )
    p.add_argument("--broker", help="use this broker (mqtt://HOST:PORT) instead of an embedded one")
    p.add_argument("--duration", type=float, default=30.0, help="seconds of replay (default 30)")
    p.add_argument("--models", type=Path, help="model repository (default: ./models, else the source tree's)")
    p.add_argument("--report", type=Path, default=Path("moesaic-demo-report"), help="report folder")
    # What the shipped CPU experts sustain on a 2-core machine beside the rest of the fleet (a
    # LiDAR frame costs two PPN calls); faster, the bridge's latest-frame queues drop frames.
    p.add_argument("--lidar-hz", type=float, default=2.0, help="LiDAR replay rate (default 2)")
    p.add_argument("--camera-hz", type=float, default=1.0, help="camera replay rate (default 1)")
    p.add_argument("--lidar", type=Path, help="folder of KITTI .bin scans (default: the bundled sample)")
    p.add_argument("--camera", type=Path, help="folder of JPEG/PNG frames (default: the bundled sample)")
    p.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    p.add_argument(
        "--cache", type=Path, help="folder of the trained gates (default: $XDG_CACHE_HOME/moesaic/demo)"
    )
    p.add_argument("--retrain-gates", action="store_true", help="train every gate again, ignoring the cache")
    p.add_argument(
        "--dashboard",
        default="127.0.0.1:8321",
        metavar="HOST:PORT",
        help="serve the live dashboard here while the demo runs (default 127.0.0.1:8321)",
    )
    p.add_argument("--no-dashboard", action="store_true", help="do not serve the live dashboard")
    p.set_defaults(func=run_demo)


def _default_models() -> Path:
    here = Path("models")
    if here.is_dir() and any(here.iterdir()):
        return here
    return Path(__file__).resolve().parents[2] / "models"


def _files(folder: Path | None, patterns: tuple[str, ...]) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


def missing_extra(*, embedded_broker: bool) -> MissingExtraError | None:
    """What the demo's processes would miss, checked before any starts: the roles' packages
    (``demo`` extra), the embedded broker's when no ``--broker`` is given, and a runtime."""
    from moesaic.runtime.engine import MissingExtraError  # not at import: `moesaic --help` stays fast

    needed = [("aiomqtt", "aiomqtt"), ("ensemble_boxes", "ensemble-boxes")]
    if embedded_broker:
        needed.append(("amqtt", "amqtt"))
    for module, package in needed:
        if importlib.util.find_spec(module) is None:
            return MissingExtraError(package, "demo")
    if importlib.util.find_spec("onnxruntime") is None:
        return MissingExtraError("onnxruntime", "demo,cpu", "demo,gpu")
    return None


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic demo``; returns the exit status."""
    from rich.console import Console

    from moesaic.demo.fleet import CAMERA_TASKS, LIDAR_TASKS, find_experts
    from moesaic.demo.run import ASSETS, Demo

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
    missing = missing_extra(embedded_broker=args.broker is None)
    if missing is not None:
        console.print(f"[red]moesaic demo:[/red] {missing}", highlight=False)
        return 2
    models = args.models or _default_models()
    experts = find_experts(models)
    if not experts:
        console.print(
            f"[red]moesaic demo: no experts in {models}[/red]: expected model folders whose model.yaml has "
            "task: bev_segmentation, bev_reconstruction or detection (see docs/demo.md)"
        )
        return 2
    lidar = _files(args.lidar or ASSETS / "sample_lidar" / "velodyne", ("*.bin",))
    camera = _files(args.camera or ASSETS / "sample_camera", ("*.jpg", "*.jpeg", "*.png"))
    tasks = {e.task for e in experts}
    lidar_tasks = [t for t in LIDAR_TASKS if t in tasks] if lidar else []
    camera_tasks = [t for t in CAMERA_TASKS if t in tasks] if camera else []
    if not lidar_tasks and not camera_tasks:
        console.print("[red]moesaic demo: no sample frames for the experts found[/red]")
        return 2
    if args.duration <= 0 or args.lidar_hz <= 0 or args.camera_hz <= 0:
        console.print("[red]moesaic demo: --duration, --lidar-hz and --camera-hz must be > 0[/red]")
        return 2
    demo = Demo(
        args, console, experts, lidar=lidar, camera=camera, lidar_tasks=lidar_tasks, camera_tasks=camera_tasks
    )
    return demo.run()
