"""``moesaic demo``: the whole system on this machine, end to end, in about a minute.

Starts, as one process tree: an embedded MQTT broker (unless ``--broker``), two or three
nodes with different thread counts serving the experts in ``models/``, the coordinator and
the MQTT bridge. Replays the bundled LiDAR and camera samples through MQTT at sensor rate,
each frame with its own budget, shows a live table, prints a summary and writes an HTML
report (BEV segmentation images, detection overlays). Every child is stopped on exit, on
Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import logging
import signal
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register", "run_demo"]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent / "assets"
LIDAR_SENSOR = "roof-lidar"
CAMERA_SENSOR = "front-camera"
# Per-request budgets the replay cycles through: (latency ms, energy mJ); 0 = unbounded.
# Sized for the shipped CPU experts on a 2-core machine running the whole fleet (a PPN expert
# takes ~150 ms there, a detector 50-250 ms): most budgets fit one or two experts, and one
# LiDAR budget (100 ms) fits none on purpose, so the summary shows budget_met=false too.
LIDAR_BUDGETS = ((400.0, 0.0), (100.0, 0.0), (600.0, 2500.0), (300.0, 0.0))
CAMERA_BUDGETS = ((500.0, 0.0), (250.0, 0.0))


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
    p.add_argument("--lidar-hz", type=float, default=10.0, help="LiDAR replay rate (default 10)")
    p.add_argument("--camera-hz", type=float, default=2.0, help="camera replay rate (default 2)")
    p.add_argument("--lidar", type=Path, help="folder of KITTI .bin scans (default: the bundled sample)")
    p.add_argument("--camera", type=Path, help="folder of JPEG/PNG frames (default: the bundled sample)")
    p.add_argument("--no-live", action="store_true", help="print progress lines instead of a live table")
    p.set_defaults(func=run_demo)


def _default_models() -> Path:
    here = Path("models")
    if here.is_dir() and any(here.iterdir()):
        return here
    return Path(__file__).resolve().parent.parent / "models"


def _files(folder: Path | None, patterns: tuple[str, ...]) -> list[Path]:
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for pattern in patterns for p in folder.rglob(pattern))


def run_demo(args: argparse.Namespace) -> int:
    """Entry point of ``moesaic demo``."""
    from rich.console import Console

    from moesaic.demo_fleet import find_experts

    console = Console()
    if not console.is_terminal:
        console = Console(width=160)
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
    lidar_tasks: list[str] = (
        [t for t in ("bev_segmentation", "bev_reconstruction") if t in tasks] if lidar else []
    )
    camera_tasks = ["detection"] if camera and "detection" in tasks else []
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


MAX_RESTARTS = 3
"""How often the demo restarts a component that dies during the replay before giving up."""


class Demo:
    """One run of the demo: start the tree, replay, summarise, stop."""

    def __init__(
        self,
        args: argparse.Namespace,
        console: Any,
        experts: list[Any],
        *,
        lidar: list[Path],
        camera: list[Path],
        lidar_tasks: list[str],
        camera_tasks: list[str],
    ) -> None:
        from moesaic.demo_report import DemoStats

        self.args = args
        self.console = console
        self.experts = experts
        self.lidar = lidar if lidar_tasks else []
        self.camera = camera if camera_tasks else []
        self.lidar_tasks = lidar_tasks
        self.camera_tasks = camera_tasks
        self.stats = DemoStats()
        self.stats.sample_every = {
            "lidar": max(1, int(args.duration * args.lidar_hz / 6)),
            "camera": max(1, int(args.duration * args.camera_hz / 6)),
        }
        self.notes: list[str] = []

    def run(self) -> int:
        from moesaic.demo_fleet import ProcessTree

        workdir = Path(tempfile.mkdtemp(prefix="moesaic-demo-"))
        (workdir / "logs").mkdir()
        tree = ProcessTree(workdir / "logs")
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def on_signal(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        for sig in previous:
            signal.signal(sig, on_signal)
        status = 1
        # Startup (nodes 120 s, coordinator 60 s, bridge 30 s), the replay, the drain and the
        # report: past this the demo is stuck somewhere, and stops its fleet instead of hanging.
        limit = 240 + self.args.duration
        try:
            status = asyncio.run(asyncio.wait_for(self._main(tree, workdir), limit))
        except TimeoutError:
            self.console.print(f"[red]the demo did not end within {limit:.0f} s: stopping all[/red]")
            status = 1
        except KeyboardInterrupt:
            self.console.print("[yellow]interrupted: stopping every process[/yellow]")
            status = 130
        except SystemExit as exc:  # a child died or did not come up; already reported
            status = int(exc.code or 1)
        finally:
            tree.stop()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if status == 0:
            self.console.print(f"logs of every process: {workdir / 'logs'}")
        return status

    # ----------------------------------------------------------------- startup

    async def _main(self, tree: Any, workdir: Path) -> int:
        from moesaic.demo_fleet import plan_fleet, write_node_repo
        from moesaic.ingest.broker import free_port

        started = time.monotonic()
        say = self.console.print
        broker = self.args.broker
        if broker is None:
            port = free_port()
            tree.spawn("broker", ["moesaic.ingest.broker", "--port", str(port)])
            broker = f"mqtt://127.0.0.1:{port}"
        nodes = plan_fleet(self.experts)
        for node in nodes:
            node.port, node.metrics_port = free_port(), free_port()
            repo = write_node_repo(node, workdir / "nodes")
            tree.spawn(
                node.name,
                [
                    *("moesaic", "node", "--models", str(repo), "--listen", node.address),
                    *("--node-id", node.name, "--metrics-port", str(node.metrics_port)),
                ],
                env={"OMP_NUM_THREADS": str(node.threads), "MKL_NUM_THREADS": str(node.threads)},
            )
        described = ", ".join(f"{n.name}: {n.threads} thread(s)" for n in nodes)
        say(f"starting broker, {len(nodes)} nodes ({described})")
        await self._wait(tree, [n.address for n in nodes], "nodes", timeout=120)
        coordinator, coordinator_metrics = f"127.0.0.1:{free_port()}", free_port()
        fleet_yaml = workdir / "fleet.yaml"
        fleet_yaml.write_text(_fleet_yaml(nodes, coordinator_metrics))
        tree.spawn(
            "coordinator", ["moesaic", "coordinator", "--config", str(fleet_yaml), "--listen", coordinator]
        )
        await self._wait(tree, [coordinator], "coordinator", timeout=60)
        ingest_metrics = free_port()
        ingest_yaml = workdir / "ingest.yaml"
        ingest_yaml.write_text(_ingest_yaml(self.lidar_tasks, self.camera_tasks, ingest_metrics))
        tree.spawn(
            "ingest",
            [
                "moesaic",
                "ingest",
                "--config",
                str(ingest_yaml),
                "--broker",
                broker,
                "--coordinator",
                coordinator,
            ],
        )
        say(f"fleet up in {time.monotonic() - started:.1f} s; replaying for {self.args.duration:.0f} s")
        status = await self._replay(tree, broker, ingest_metrics)
        if status:
            return status
        self.stats.dropped = _scrape(ingest_metrics, "moesaic_mqtt_frames_dropped_total")
        endpoints = {"ingest": ingest_metrics, "coordinator": coordinator_metrics}
        endpoints.update({n.name: n.metrics_port for n in nodes})
        _save_metrics(endpoints, self.args.report / "metrics")
        violations = _scrape(coordinator_metrics, "moesaic_budget_violations_total")
        if violations:
            self.notes.append(
                "Budget violations counted by the coordinator: "
                + ", ".join(f"{_labels(k)} x{v:.0f}" for k, v in sorted(violations.items()))
            )
        self._finish(nodes)
        return 0

    async def _wait(self, tree: Any, addresses: list[str], what: str, *, timeout: float) -> None:
        import grpc
        from grpc_health.v1 import health_pb2, health_pb2_grpc

        deadline = time.monotonic() + timeout
        for address in addresses:
            async with grpc.aio.insecure_channel(address) as channel:
                stub = health_pb2_grpc.HealthStub(channel)
                while True:
                    failed = tree.failed()
                    if failed is not None:
                        raise SystemExit(self._died(tree, failed))
                    with contextlib.suppress(grpc.aio.AioRpcError):
                        reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
                        if reply.status == health_pb2.HealthCheckResponse.SERVING:
                            break
                    if time.monotonic() > deadline:
                        raise SystemExit(self._fail(f"{what} at {address} not serving after {timeout:.0f} s"))
                    await asyncio.sleep(0.2)

    def _restart(self, tree: Any, child: Any) -> bool:
        """Start a component that died during the replay again (at most ``MAX_RESTARTS`` times),
        as systemd's Restart=on-failure would; one failure never stops the whole fleet."""
        if child.restarts >= MAX_RESTARTS:
            return False
        status = child.process.returncode
        fresh = tree.restart(child)
        note = f"{child.name} exited with status {status} and was restarted ({fresh.restarts}/{MAX_RESTARTS})"
        self.console.print(f"[yellow]{note}[/yellow]")
        self.notes.append(note + ".")
        return True

    def _died(self, tree: Any, child: Any) -> int:
        self.console.print(f"[red]{child.name} exited with status {child.process.returncode}[/red]; its log:")
        self.console.print(tree.tail(child), markup=False, highlight=False)
        return 1

    def _fail(self, message: str) -> int:
        self.console.print(f"[red]moesaic demo: {message}[/red]")
        return 1

    # ----------------------------------------------------------------- replay

    async def _replay(self, tree: Any, broker: str, ingest_metrics: int) -> int:
        import aiomqtt
        from rich.live import Live

        from moesaic.demo_report import live_table
        from moesaic.ingest.config import parse_broker_url

        address = parse_broker_url(broker)
        client = aiomqtt.Client(address.host, address.port, protocol=aiomqtt.ProtocolVersion.V311, timeout=10)
        async with client:
            await client.subscribe("moesaic/v1/results/#", qos=1)
            await client.subscribe("moesaic/v1/errors/#", qos=1)
            await client.subscribe("moesaic/v1/status/ingest", qos=1)
            online = asyncio.Event()
            receiver = asyncio.create_task(self._receive(client, online))
            try:
                await self._until(online, tree, 30, "the bridge did not come online within 30 s")
                stop = asyncio.Event()
                publishers = [
                    asyncio.create_task(self._publish_lidar(client, stop)),
                    asyncio.create_task(self._publish_camera(client, stop)),
                ]
                live = self.console.is_terminal and not self.args.no_live
                end = time.monotonic() + self.args.duration
                with (
                    Live(live_table(self.stats), console=self.console, refresh_per_second=4)
                    if live
                    else (contextlib.nullcontext()) as view
                ):
                    last_line = 0.0
                    while time.monotonic() < end:
                        failed = tree.failed()
                        if failed is not None and not self._restart(tree, failed):
                            return self._died(tree, failed)
                        await asyncio.sleep(0.25)
                        if view is not None:
                            view.update(live_table(self.stats))
                        elif time.monotonic() - last_line > 5:
                            last_line = time.monotonic()
                            self.console.print(_progress_line(self.stats))
                    await self._stop_publishing(stop, publishers)
                    await self._drain(view)
            finally:
                receiver.cancel()
                with contextlib.suppress(asyncio.CancelledError, aiomqtt.MqttError, TimeoutError):
                    await asyncio.wait_for(receiver, 5)
        return 0

    @staticmethod
    async def _stop_publishing(stop: asyncio.Event, publishers: list[asyncio.Task[None]]) -> None:
        """End the replay: the publishers see ``stop`` at their next frame, and are cancelled too;
        neither alone is trusted to end a publish stuck in the MQTT client."""
        stop.set()
        for task in publishers:
            task.cancel()
        _, pending = await asyncio.wait(publishers, timeout=5)
        if pending:
            log.warning("%d publisher(s) did not stop within 5 s", len(pending))

    async def _until(self, event: asyncio.Event, tree: Any, timeout: float, message: str) -> None:
        deadline = time.monotonic() + timeout
        while not event.is_set():
            failed = tree.failed()
            if failed is not None:
                raise SystemExit(self._died(tree, failed))
            if time.monotonic() > deadline:
                raise SystemExit(self._fail(message))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), 0.2)

    async def _drain(self, view: Any) -> None:
        """Wait (up to 5 s) for the results of frames still in flight."""
        from moesaic.demo_report import live_table

        deadline = time.monotonic() + 5
        last = -1
        while time.monotonic() < deadline:
            count = sum(t.results for t in self.stats.tasks.values()) + sum(self.stats.errors.values())
            if count == last:
                break
            last = count
            await asyncio.sleep(1.0)
            if view is not None:
                view.update(live_table(self.stats))

    async def _receive(self, client: Any, online: asyncio.Event) -> None:
        async for message in client.messages:
            topic = str(message.topic)
            payload = bytes(message.payload)
            try:
                if topic.startswith("moesaic/v1/results/"):
                    self.stats.result(topic, payload)
                elif topic.startswith("moesaic/v1/errors/"):
                    self.stats.error(payload)
                elif topic == "moesaic/v1/status/ingest" and payload == b"online":
                    online.set()
            except (ValueError, KeyError) as exc:
                log.warning("unreadable message on %s: %s", topic, exc)

    async def _publish_lidar(self, client: Any, stop: asyncio.Event) -> None:
        from moesaic.proto import moesaic_pb2

        scans = [p.read_bytes() for p in self.lidar]
        await self._publish_loop(
            client,
            stop,
            LIDAR_SENSOR,
            "lidar",
            self.args.lidar_hz,
            scans,
            LIDAR_BUDGETS,
            lambda data, i, budget: moesaic_pb2.SensorFrame(
                timestamp=time.time(), frame_id=i, encoding="kitti-f32x4", data=data, budget=budget
            ),
        )

    async def _publish_camera(self, client: Any, stop: asyncio.Event) -> None:
        from moesaic.proto import moesaic_pb2

        frames = [p.read_bytes() for p in self.camera]
        await self._publish_loop(
            client,
            stop,
            CAMERA_SENSOR,
            "camera",
            self.args.camera_hz,
            frames,
            CAMERA_BUDGETS,
            lambda data, i, budget: moesaic_pb2.SensorFrame(
                timestamp=time.time(),
                frame_id=i,
                encoding="png" if data.startswith(b"\x89PNG") else "jpeg",
                data=data,
                budget=budget,
            ),
        )

    async def _publish_loop(
        self,
        client: Any,
        stop: asyncio.Event,
        sensor: str,
        kind: str,
        hz: float,
        frames: list[bytes],
        budgets: tuple[tuple[float, float], ...],
        envelope: Callable[[bytes, int, Any], Any],
    ) -> None:
        """Publish ``frames`` in a loop at ``hz``, each in a SensorFrame with the next budget."""
        from moesaic.proto import moesaic_pb2

        if not frames:
            return
        period = 1.0 / hz
        start = time.monotonic()
        for i, (data, (latency, energy)) in enumerate(zip(itertools.cycle(frames), itertools.cycle(budgets))):
            if stop.is_set():
                return
            budget = moesaic_pb2.Budget(latency_ms=latency, energy_mj=energy)
            payload = envelope(data, i, budget).SerializeToString()
            self.stats.published(sensor, kind, i, image=data if kind == "camera" else None)
            await client.publish(f"moesaic/v1/sensors/{sensor}/{kind}", payload, qos=0, timeout=5)
            await asyncio.sleep(max(0.0, start + (i + 1) * period - time.monotonic()))

    # ----------------------------------------------------------------- the end

    def _finish(self, nodes: list[Any]) -> None:
        from moesaic.demo_report import summary_table, write_report

        self.console.print(summary_table(self.stats))
        try:
            from moesaic.datasets.lidar_scenes import CLASS_NAMES

            class_names: tuple[str, ...] = tuple(CLASS_NAMES)
        except ImportError:
            class_names = ()
        fleet = [
            {"name": n.name, "threads": n.threads, "experts": [e.name for e in n.experts]} for n in nodes
        ]
        if not self.camera:
            self.notes.append("No camera stream: no detector in the model repository or no sample frames.")
        index = write_report(
            self.args.report,
            self.stats,
            fleet=fleet,
            class_names=class_names,
            font_path=ASSETS / "fonts" / "DejaVuSans.ttf",
            notes=self.notes,
        )
        self.console.print(f"report: {index.resolve()}")


def _labels(text: str) -> str:
    """``kind="latency",task="detection"`` -> ``detection latency``."""
    pairs = dict(part.split("=", 1) for part in text.split(",") if "=" in part)
    return " ".join(v.strip('"') for _, v in sorted(pairs.items(), key=lambda kv: kv[0] != "task"))


def _progress_line(stats: Any) -> str:
    parts = [f"{stats.frames} frames"]
    for task, s in sorted(stats.tasks.items()):
        parts.append(f"{task}: {s.results} results, {s.mean(s.latency_ms):.0f} ms")
    return "; ".join(parts)


def _fleet_yaml(nodes: list[Any], metrics_port: int) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "coordinator": {"metrics_port": metrics_port},
            "nodes": [{"address": n.address, "name": n.name} for n in nodes],
        },
        sort_keys=False,
    )


def _ingest_yaml(lidar_tasks: list[str], camera_tasks: list[str], metrics_port: int) -> str:
    import yaml

    return yaml.safe_dump(
        {
            "component": "ingest",
            "protocol": "3.1.1",
            "metrics_port": metrics_port,
            "request_timeout_s": 5.0,
            "defaults": {
                "lidar": {"tasks": lidar_tasks or ["bev_segmentation"]},
                "camera": {"tasks": camera_tasks or ["detection"]},
            },
        },
        sort_keys=False,
    )


def _save_metrics(endpoints: dict[str, int], folder: Path) -> None:
    """Save each component's /metrics text into ``folder/NAME.txt`` (for the report)."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, port in endpoints.items():
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                (folder / f"{name}.txt").write_bytes(response.read())
        except OSError as exc:
            log.warning("metrics of %s unreachable: %s", name, exc)


def _scrape(port: int, metric: str) -> dict[str, float]:
    """``{labels: value}`` of one counter from a local Prometheus endpoint; empty when unreachable."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return {}
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            name, _, value = line.rpartition(" ")
            labels = name[len(metric) :].strip("{}")
            values[labels or metric] = values.get(labels or metric, 0.0) + float(value)
    return values


if __name__ == "__main__":  # pragma: no cover
    sys.exit(run_demo(argparse.Namespace()))
