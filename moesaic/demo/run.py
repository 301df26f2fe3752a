"""One run of the demo: start the process tree, train or load the gates, replay, summarise, stop.

Startup order: broker (unless ``--broker``), nodes, then each task's gate (trained on the
started nodes the first time, from the cache after, :mod:`moesaic.demo.gates`), the
coordinator with a fleet config that declares those gates, and the bridge. A component that
dies during the replay is restarted (up to :data:`MAX_RESTARTS` times), as systemd's
Restart=on-failure would. Every child is stopped on exit, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import Any

from moesaic.demo import metrics
from moesaic.demo.fleet import (
    Expert,
    NodePlan,
    TaskFiles,
    fleet_yaml,
    ingest_yaml,
    plan_fleet,
    write_node_repo,
)
from moesaic.demo.replay import CAMERA_SENSOR, LIDAR_SENSOR, Replay
from moesaic.demo.report import Samples, live_table, summary_table, write_report
from moesaic.demo.summary import Ledger, summarise
from moesaic.fleet import Child, ProcessTree, free_port, wait_grpc_serving

__all__ = ["ASSETS", "MAX_RESTARTS", "Demo"]

log = logging.getLogger(__name__)

ASSETS = Path(__file__).resolve().parent.parent / "assets"
MAX_RESTARTS = 3
"""How often the demo restarts a component that dies during the replay before giving up."""


class Demo:
    """One run of the demo: start the tree, replay, summarise, stop."""

    def __init__(
        self,
        args: argparse.Namespace,
        console: Any,
        experts: list[Expert],
        *,
        lidar: list[Path],
        camera: list[Path],
        lidar_tasks: list[str],
        camera_tasks: list[str],
    ) -> None:
        self.args = args
        self.console = console
        self.experts = experts
        self.lidar_tasks = lidar_tasks
        self.camera_tasks = camera_tasks
        self.ledger = Ledger({LIDAR_SENSOR: lidar_tasks, CAMERA_SENSOR: camera_tasks})
        every = {
            "lidar": max(1, int(args.duration * args.lidar_hz / 6)),
            "camera": max(1, int(args.duration * args.camera_hz / 6)),
        }
        self.replay = Replay(
            self.ledger,
            Samples(every),
            lidar=lidar if lidar_tasks else [],
            camera=camera if camera_tasks else [],
            lidar_hz=args.lidar_hz,
            camera_hz=args.camera_hz,
        )
        self.gates: dict[str, TaskFiles] = {}
        self.notes: list[str] = []

    def run(self) -> int:
        workdir = Path(tempfile.mkdtemp(prefix="moesaic-demo-"))
        (workdir / "logs").mkdir()
        tree = ProcessTree(workdir / "logs")
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}

        def on_signal(signum: int, frame: object) -> None:
            raise KeyboardInterrupt

        for sig in previous:
            signal.signal(sig, on_signal)
        status = 1
        # Startup (nodes 120 s, gates 300 s, coordinator 60 s, bridge 30 s), the replay, the
        # drain and the report: past this the demo is stuck, and stops its fleet instead of hanging.
        limit = 540 + self.args.duration
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

    async def _main(self, tree: ProcessTree, workdir: Path) -> int:
        async with contextlib.AsyncExitStack() as stack:
            return await self._run_fleet(tree, workdir, stack)

    async def _run_fleet(self, tree: ProcessTree, workdir: Path, stack: contextlib.AsyncExitStack) -> int:
        started = time.monotonic()
        say = self.console.print
        broker = self.args.broker
        if broker is None:
            port = free_port()
            tree.spawn("broker", ["moesaic.ingest.broker", "--port", str(port)])
            broker = f"mqtt://127.0.0.1:{port}"
        dashboard = await self._dashboard(stack, broker)
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
            if dashboard is not None:
                dashboard.add_node(node.address, name=node.name)
                dashboard.add_metrics(f"http://127.0.0.1:{node.metrics_port}/metrics", name=node.name)
        described = ", ".join(f"{n.name}: {n.threads} thread(s)" for n in nodes)
        say(f"starting broker, {len(nodes)} nodes ({described})")
        await self._wait(tree, [n.address for n in nodes], "nodes", timeout=120)
        await self._gates(nodes, workdir)
        coordinator, coordinator_metrics = f"127.0.0.1:{free_port()}", free_port()
        fleet = workdir / "fleet.yaml"
        fleet.write_text(fleet_yaml(nodes, coordinator_metrics, self.gates))
        tree.spawn("coordinator", ["moesaic", "coordinator", "--config", str(fleet), "--listen", coordinator])
        ingest_metrics = free_port()
        ingest = workdir / "ingest.yaml"
        ingest.write_text(ingest_yaml(self.lidar_tasks, self.camera_tasks, ingest_metrics))
        # The bridge starts beside the coordinator (its channel connects when first used); the
        # replay starts once both are up.
        tree.spawn(
            "ingest",
            ["moesaic", "ingest", "--config", str(ingest), "--broker", broker, "--coordinator", coordinator],
        )
        await self._wait(tree, [coordinator], "coordinator", timeout=60)
        if dashboard is not None:
            dashboard.add_coordinator(coordinator)
            for name, port in (("coordinator", coordinator_metrics), ("ingest", ingest_metrics)):
                dashboard.add_metrics(f"http://127.0.0.1:{port}/metrics", name=name)
        await self._replay(tree, broker, started)
        duration = time.monotonic() - self.replay.started
        texts = {"ingest": metrics.fetch(ingest_metrics), "coordinator": metrics.fetch(coordinator_metrics)}
        texts.update({n.name: metrics.fetch(n.metrics_port) for n in nodes})
        metrics.save(texts, self.args.report / "metrics")
        self._finish(nodes, duration, texts["ingest"])
        return 0

    async def _dashboard(self, stack: contextlib.AsyncExitStack, broker: str) -> Any:
        """The live dashboard on ``--dashboard`` (None with ``--no-dashboard`` or when it cannot
        start: the demo goes on without it)."""
        if self.args.no_dashboard:
            return None
        try:
            from moesaic.dashboard import fleet_dashboard

            dashboard = fleet_dashboard(self.args.dashboard, broker=broker, protocol="auto")
            await stack.enter_async_context(dashboard)
        except (OSError, ImportError, ValueError) as exc:  # port taken, extra missing, bad address
            self.console.print(f"[yellow]no dashboard: {exc}[/yellow]", highlight=False)
            return None
        self.console.print(f"dashboard: {dashboard.url}", highlight=False)
        return dashboard

    async def _gates(self, nodes: list[NodePlan], workdir: Path) -> None:
        """Each task's gate, trained on the running nodes the first time, then from the cache."""
        from moesaic.demo.gates import cache_root, prepare_gates

        started = time.monotonic()
        cache = self.args.cache or cache_root()
        reports = await prepare_gates(
            nodes,
            [*self.lidar_tasks, *self.camera_tasks],
            cache=cache,
            work=workdir / "labelled",
            console=self.console,
            retrain=self.args.retrain_gates,
        )
        for task, report in reports.items():
            style = "" if report.files else "[yellow]"
            self.console.print(f"{style}gate of {task}: {report.detail}", highlight=False)
            if report.files is None:
                self.notes.append(
                    f"The gate of {task} could not be trained: prior weights ({report.detail})."
                )
        self.gates = {task: r.files for task, r in reports.items() if r.files is not None}
        trained = sum(not r.cached and r.files is not None for r in reports.values())
        self.console.print(
            f"gates ready in {time.monotonic() - started:.1f} s "
            f"({trained} trained, {sum(r.cached for r in reports.values())} from the cache {cache})",
            highlight=False,
        )

    async def _wait(self, tree: ProcessTree, addresses: list[str], what: str, *, timeout: float) -> None:
        def alive() -> None:
            failed = tree.failed()
            if failed is not None:
                raise SystemExit(self._died(tree, failed))

        for address in addresses:
            try:
                await wait_grpc_serving(address, timeout=timeout, check=alive)
            except TimeoutError:
                raise SystemExit(
                    self._fail(f"{what} at {address} not serving after {timeout:.0f} s")
                ) from None

    # ----------------------------------------------------------------- replay

    async def _replay(self, tree: ProcessTree, broker: str, started: float) -> None:
        import aiomqtt
        from rich.live import Live

        from moesaic.ingest.config import parse_broker_url

        address = parse_broker_url(broker)
        client = aiomqtt.Client(address.host, address.port, protocol=aiomqtt.ProtocolVersion.V311, timeout=10)
        live = self.console.is_terminal and not self.args.no_live
        last_line = time.monotonic()

        def table() -> Any:
            summary = summarise(self.ledger, duration_s=time.monotonic() - self.replay.started, gates={})
            return live_table(summary, self.replay.last, frames=self.ledger.frames)

        async def until_online(event: asyncio.Event) -> None:
            deadline = time.monotonic() + 30
            while not event.is_set():
                self._check(tree, restart=True)
                if time.monotonic() > deadline:
                    raise SystemExit(self._fail("the bridge did not come online within 30 s"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(event.wait(), 0.2)
            self.console.print(
                f"fleet up in {time.monotonic() - started:.1f} s; replaying for {self.args.duration:.0f} s"
            )

        with (
            Live(table(), console=self.console, refresh_per_second=4)
            if live
            else contextlib.nullcontext() as view
        ):

            async def tick() -> None:
                nonlocal last_line
                self._check(tree, restart=True)
                if view is not None:
                    view.update(table())
                elif time.monotonic() - last_line > 5:
                    last_line = time.monotonic()
                    self.console.print(_progress_line(self.ledger, self.replay.last))

            async with client:
                await self.replay.run(
                    client, duration=self.args.duration, tick=tick, until_online=until_online
                )

    def _check(self, tree: ProcessTree, *, restart: bool) -> None:
        """Raise ``SystemExit`` when a child died (after restarting it, while ``restart`` allows)."""
        failed = tree.failed()
        if failed is not None and not (restart and self._restart(tree, failed)):
            raise SystemExit(self._died(tree, failed))

    def _restart(self, tree: ProcessTree, child: Child) -> bool:
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

    def _died(self, tree: ProcessTree, child: Child) -> int:
        self.console.print(f"[red]{child.name} exited with status {child.process.returncode}[/red]; its log:")
        self.console.print(tree.tail(child), markup=False, highlight=False)
        return 1

    def _fail(self, message: str) -> int:
        self.console.print(f"[red]moesaic demo: {message}[/red]")
        return 1

    # ----------------------------------------------------------------- the end

    def _finish(self, nodes: list[NodePlan], duration: float, ingest_metrics: str) -> None:
        bridge = {
            "frames_dropped": metrics.labelled(
                metrics.samples(ingest_metrics, "moesaic_mqtt_frames_dropped_total"), "reason"
            ),
            "frames_missing": sum(
                metrics.samples(ingest_metrics, "moesaic_mqtt_frames_missing_total").values()
            ),
            "errors": metrics.labelled(
                metrics.samples(ingest_metrics, "moesaic_mqtt_errors_total"), "reason"
            ),
        }
        gates = {task: "trained" for task in self.gates}
        summary = summarise(self.ledger, duration_s=duration, gates=gates, bridge=bridge)
        out = self.args.report
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.replay.received))
        self.console.print(summary_table(summary))
        try:
            from moesaic.datasets.lidar_scenes import CLASS_NAMES

            class_names: tuple[str, ...] = tuple(CLASS_NAMES)
        except ImportError:
            class_names = ()
        fleet = [
            {"name": n.name, "threads": n.threads, "experts": [e.name for e in n.experts]} for n in nodes
        ]
        if not self.camera_tasks:
            self.notes.append("No camera stream: no detector in the model repository or no sample frames.")
        index = write_report(
            out,
            summary,
            self.replay.samples,
            fleet=fleet,
            class_names=class_names,
            font_path=ASSETS / "fonts" / "DejaVuSans.ttf",
            notes=self.notes,
            errors=self.replay.error_examples,
        )
        self.console.print(f"summary: {(out / 'summary.json').resolve()}")
        self.console.print(f"report: {index.resolve()}")


def _progress_line(ledger: Ledger, last: dict[str, dict[str, Any]]) -> str:
    parts = [f"{ledger.frames} frames"]
    for task, t in sorted(ledger.tasks.items()):
        latency = last.get(task, {}).get("latency_ms", 0.0)
        parts.append(f"{task}: {len(t.results)} results, {len(t.errors)} errors, last {latency:.0f} ms")
    return "; ".join(parts)
