"""``moesaic profile``: what each model costs on this device, timed on the path the node runs.

A profile that timed the engine alone would under-predict: the node also decodes the request,
pre-processes, post-processes and encodes the reply. So each call here is a node request
without the socket: the request bytes a client would send, decoded and validated by
:class:`~moesaic.nodes.validation.RequestValidator`, run by the node's
:class:`~moesaic.nodes.dataplane.DataPlane` (queue, pre-process, engine, post-process) and
encoded as the reply. Energy comes from the same :class:`~moesaic.runtime.cost.CostMeter`
the node uses: the model's attributed dynamic energy over the timed calls, after the meter
learnt the idle draw. Each record's ``latency_ms`` is the compute a node reports as
``compute_ms`` (pre + engine + post), the figure the coordinator later compares against;
``stages_ms`` gives each stage's median, codec included. The calls arrive as a node's
requests do: each on the next of a pool of threads, with a short gap between them.

    moesaic profile --models models --device cuda:0 --batch 1,4 --out profile.json
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from moesaic.nodes.codec import encode_request, encode_response
from moesaic.nodes.dataplane import DataPlane, Stages
from moesaic.nodes.served import ServedModel
from moesaic.nodes.validation import RequestValidator
from moesaic.nodes.wire import RAW_INPUT_FIELD
from moesaic.runtime.profiler import LatencyQuantiles, ProfileRecord

__all__ = ["profile_served", "register"]


def profile_served(
    plane: DataPlane,
    model: ServedModel,
    inputs: Mapping[str, np.ndarray],
    *,
    runs: int,
    warmup: int,
    idle_s: float = 2.0,
    min_duration_s: float = 0.0,
    on_run: Callable[[int], None] | None = None,
    threads: int = 8,
    gap_s: float = 0.0005,
) -> ProfileRecord:
    """Time ``runs`` (at least; more until ``min_duration_s``) node-path calls of ``model``.

    1. ``warmup`` untimed calls; 2. ``idle_s`` with no work, so the cost meter learns the
    idle draw; 3. the timed calls; 4. a pause for the meter's last intervals to close.

    The calls run as a node's requests do: each on the next of ``threads`` threads (a node's
    gRPC pool), with ``gap_s`` between one call's end and the next one's start (a client's
    round trip). Back to back on one thread, a loaded machine's scheduler treats the loop as
    a CPU hog and preempts it more than the node's requests (BENCHMARKS.md section 12).
    """
    if runs < 1:
        raise ValueError(f"runs: must be >= 1, got {runs}")
    request = encode_request(model.name, dict(inputs))
    validator = RequestValidator(plane.ready_model)
    first = next(iter(inputs.values()), None)
    batch = int(first.shape[0]) if first is not None and first.ndim > 0 else 1
    cost = plane.cost

    def call() -> tuple[float, Stages]:
        """One request; (seconds in the codec, the data plane's stages)."""
        t0 = time.perf_counter()
        decoded = validator.decode(request, RAW_INPUT_FIELD)
        t1 = time.perf_counter()
        reply = plane.infer(decoded.model, decoded.inputs, decoded.parameters)
        t2 = time.perf_counter()
        encode_response(model.name, reply.outputs, parameters={"energy_mj": reply.energy_j * 1e3})
        return (t1 - t0) + (time.perf_counter() - t2), reply.stages

    timed = _ThreadRotation(call, threads)
    codec: list[float] = []
    pre: list[float] = []
    engine: list[float] = []
    post: list[float] = []
    compute: list[float] = []
    try:
        for _ in range(max(warmup, timed.threads)):  # every thread warm
            timed()
        if idle_s > 0:
            time.sleep(idle_s)
        before = cost.snapshot().attributed.get(model.name, 0.0)
        start = time.perf_counter()
        while len(compute) < runs or time.perf_counter() - start < min_duration_s:
            codec_s, stages = timed()
            if gap_s > 0:
                time.sleep(gap_s)
            codec.append(codec_s * 1e3)
            pre.append(stages.preprocess * 1e3)
            engine.append(stages.engine * 1e3)
            post.append(stages.postprocess * 1e3)
            compute.append(stages.compute * 1e3)
            if on_run is not None:
                on_run(len(compute))
        elapsed = time.perf_counter() - start
    finally:
        timed.close()
    time.sleep(3 * cost.interval_s)  # the intervals holding the last calls close
    attributed = cost.snapshot().attributed.get(model.name, 0.0) - before
    idle = cost.idle_watts
    return ProfileRecord(
        model=model.name,
        device=model.device,
        engine=model.engine_type,
        batch_size=batch,
        latency_ms=LatencyQuantiles.of(compute),
        throughput_per_s=len(compute) * batch / elapsed,
        energy_mj_per_inference=max(attributed, 0.0) / len(compute) * 1e3,
        idle_watts=0.0 if idle != idle else idle,  # NaN: not learnt (no idle stretch yet)
        energy_source=cost.meter.source,
        stages_ms={
            "codec": statistics.median(codec),
            "preprocess": statistics.median(pre),
            "engine": statistics.median(engine),
            "postprocess": statistics.median(post),
        },
    )


class _ThreadRotation:
    """Runs each call on the next of ``threads`` threads in turn, as a node's gRPC pool spreads
    its requests (1: on the caller's thread). A thread-handoff costs the caller, not the call."""

    def __init__(self, fn: Callable[[], Any], threads: int) -> None:
        self._fn = fn
        self._next = 0
        self._slots: list[_Slot] = []
        self.threads = threads if threads > 1 else 0
        """Threads of its own (0: calls run on the caller's)."""
        self._threads: list[threading.Thread] = []
        for k in range(self.threads):
            slot = _Slot()
            thread = threading.Thread(target=self._serve, args=(slot,), daemon=True, name=f"profile-{k}")
            thread.start()
            self._slots.append(slot)
            self._threads.append(thread)

    def _serve(self, slot: _Slot) -> None:
        while True:
            slot.go.acquire()
            if slot.stop:
                return
            try:
                slot.result, slot.error = self._fn(), None
            except BaseException as exc:
                slot.result, slot.error = None, exc
            slot.done.release()

    def __call__(self) -> Any:
        if not self._slots:
            return self._fn()
        slot = self._slots[self._next % len(self._slots)]
        self._next += 1
        slot.go.release()
        slot.done.acquire()
        if slot.error is not None:
            raise slot.error
        return slot.result

    def close(self) -> None:
        for slot in self._slots:
            slot.stop = True
            slot.go.release()
        for thread in self._threads:
            thread.join(timeout=5)


class _Slot:
    """One rotation thread's hand-over: ``go`` starts a call, ``done`` says it returned."""

    __slots__ = ("done", "error", "go", "result", "stop")

    def __init__(self) -> None:
        self.go, self.done = threading.Lock(), threading.Lock()
        self.go.acquire()
        self.done.acquire()
        self.result: Any = None
        self.error: BaseException | None = None
        self.stop = False


# ---------------------------------------------------------------- the command


def register(subparsers: Any) -> None:
    """Add ``profile`` to the ``moesaic`` command."""
    p = subparsers.add_parser(
        "profile", help="measure each model's latency, throughput and energy on the node's own path"
    )
    p.add_argument("--models", type=Path, required=True, help="model repository (one folder per model)")
    p.add_argument("--model", action="append", default=None, help="profile only this model (repeatable)")
    p.add_argument("--batch", default="1", help="comma-separated batch sizes (default: 1)")
    p.add_argument("--runs", type=int, default=50, help="timed inferences per batch size (default: 50)")
    p.add_argument("--warmup", type=int, default=5, help="untimed inferences first (default: 5)")
    p.add_argument("--device", default="auto", help="cpu, cuda:N, jetson or auto (default: auto)")
    p.add_argument(
        "--idle-seconds", type=float, default=2.0, help="no work this long first: the idle draw (default: 2)"
    )
    p.add_argument(
        "--min-seconds",
        type=float,
        default=2.0,
        help="run at least this long when energy is measured (default: 2)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=8,
        help="threads the calls rotate over, as a node's requests do over its gRPC pool (default: 8)",
    )
    p.add_argument(
        "--gap-ms",
        type=float,
        default=0.5,
        help="pause between calls, as a client's round trip leaves between requests (default: 0.5)",
    )
    p.add_argument(
        "--shape", action="append", default=[], metavar="NAME=DxDx..", help="input shape (repeatable)"
    )
    p.add_argument("--out", type=Path, default=Path("profile.json"), help="profile file to write")
    p.set_defaults(func=_profile_command)


def _profile_command(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markup import escape
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from moesaic.metrics import Metrics
    from moesaic.nodes.repository import scan_models
    from moesaic.runtime.commands import parse_batches, parse_shapes, synthetic_inputs
    from moesaic.runtime.cost import CostMeter
    from moesaic.runtime.devices import discover_device
    from moesaic.runtime.energy import open_meter
    from moesaic.runtime.profiler import write_profile_file

    console = Console(stderr=True)
    try:
        batches = parse_batches(args.batch)
        shapes = parse_shapes(args.shape)
        if args.runs < 1:
            raise ValueError(f"--runs: must be >= 1, got {args.runs}")
        if args.threads < 1 or not args.gap_ms >= 0:
            raise ValueError(f"--threads must be >= 1 and --gap-ms >= 0, got {args.threads}, {args.gap_ms}")
        models = scan_models(args.models)
        if args.model:
            unknown = sorted(set(args.model) - {m.name for m in models})
            if unknown:
                raise LookupError(f"--model: {unknown} not in {args.models} (has {[m.name for m in models]})")
            models = [m for m in models if m.name in args.model]
        device = discover_device(args.device)
    except (ValueError, LookupError) as exc:
        console.print(f"[red]error:[/red] {escape(str(exc))}")
        return 2

    records: list[ProfileRecord] = []
    failed = 0
    with CostMeter(open_meter(device), device=device.id) as cost:
        label = "measured" if cost.measured else "ESTIMATED"
        console.print(f"device {device.id} ({device.name}); energy: {cost.source} ({label})")
        plane = DataPlane({m.name: m for m in models}, cost, Metrics(component="profile"))
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console, disable=not console.is_terminal) as bar:
            for served in models:
                served.load(device, cost=cost)
                if not served.ready:
                    console.print(f"[red]{escape(served.name)}: failed to load: {escape(served.error)}[/red]")
                    failed += 1
                    continue
                try:
                    for batch in batches:
                        inputs = synthetic_inputs(served.inputs, batch, shapes)
                        if inputs is None:
                            console.print(f"{served.name}: batch {batch} skipped (fixed batch dimension)")
                            continue
                        task = bar.add_task(f"{served.name} batch {batch}", total=args.runs)

                        def advance(i: int, task: Any = task) -> None:
                            bar.update(task, completed=min(i, args.runs))

                        records.append(
                            profile_served(
                                plane,
                                served,
                                inputs,
                                runs=args.runs,
                                warmup=args.warmup,
                                idle_s=args.idle_seconds,
                                min_duration_s=args.min_seconds if cost.measured else 0.0,
                                on_run=advance,
                                threads=args.threads,
                                gap_s=args.gap_ms / 1e3,
                            )
                        )
                except (ValueError, RuntimeError) as exc:
                    console.print(f"[red]{escape(served.name)}: profiling failed: {escape(str(exc))}[/red]")
                    failed += 1
                finally:
                    served.close()

    write_profile_file(args.out, records)
    _print_table(records, device)
    console.print(f"wrote {len(records)} record(s) to {args.out}")
    return 1 if failed else 0


def _print_table(records: list[ProfileRecord], device: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"profile on {device.name} ({device.id}), node path")
    columns = ("model", "engine", "batch", "p50 ms", "p95 ms", "p99 ms", "pre/engine/post/codec ms")
    for col in (*columns, "items/s", "mJ/inference", "idle W", "energy"):
        table.add_column(col, justify="left" if col in ("model", "engine", "energy") else "right")
    for r in records:
        s = r.stages_ms
        stages = "/".join(f"{s.get(k, 0.0):.2f}" for k in ("preprocess", "engine", "postprocess", "codec"))
        table.add_row(
            r.model,
            r.engine,
            str(r.batch_size),
            f"{r.latency_ms.p50:.2f}",
            f"{r.latency_ms.p95:.2f}",
            f"{r.latency_ms.p99:.2f}",
            stages,
            f"{r.throughput_per_s:.1f}",
            f"{r.energy_mj_per_inference:.2f}",
            f"{r.idle_watts:.1f}",
            r.energy_source,
        )
    out = Console()
    (out if out.is_terminal else Console(width=180)).print(table)
