"""The node server's lifecycle: bind, load models (health NOT_SERVING meanwhile), serve, drain::

    node = NodeServer(load_node_config(overrides={"listen": "127.0.0.1:0", "models": "models"}))
    node.start()
    node.wait_ready(30)
    ...
    node.stop()

Requests run on a thread pool (measured faster than ``grpc.aio`` plus an executor hop for
short models); the engine runs in the request's thread. :meth:`run` is the long-running
entry point: it loads models, tells systemd READY, feeds the watchdog from its loop while no
engine is hung (a monitor thread marks a model whose engine call runs past ``hang_timeout_s``
NOT_SERVING, and probes models idle for ``probe_interval_s``) and, on
SIGTERM or SIGINT, sets health NOT_SERVING first, lets in-flight requests finish
(``grace_seconds``) and exits. Models with ``dynamic_batching`` send their queued requests at
once when the drain starts.

Models come and go while the node serves (:mod:`moesaic.nodes.lifecycle`): the KServe
repository extension (``RepositoryModelLoad`` / ``Unload``) and, with ``watch: true``, a thread
polling the repository every ``watch_interval_s`` load new versions beside the old ones and
swap them in without a failed request.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable
from typing import Any

from grpc_health.v1 import health_pb2

from moesaic.metrics import Metrics
from moesaic.nodes.config import NodeConfig
from moesaic.nodes.dataplane import DataPlane
from moesaic.nodes.lifecycle import ModelLifecycle
from moesaic.nodes.served import ServedModel
from moesaic.nodes.servicer import INFERENCE_SERVICE, NODE_SERVICE, InferenceServicer, NodeServicer
from moesaic.proto import moesaic_pb2_grpc
from moesaic.rpc import add_health_and_reflection, add_port, create_server
from moesaic.runtime.cost import CostMeter, IntervalReport
from moesaic.runtime.devices import DeviceInfo, discover_device
from moesaic.runtime.energy import EnergyMeter, open_meter
from moesaic.runtime.profiler import ProfileRecord, load_profile_file
from moesaic.systemd import Watchdog, notify_ready, notify_status, notify_stopping

__all__ = ["NodeServer"]

log = logging.getLogger(__name__)

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class NodeServer:
    """A node serving the model repository ``config.models``.

    ``ValueError`` (naming the file and field) when the repository or a model.yaml is wrong.
    """

    def __init__(
        self,
        config: NodeConfig,
        *,
        device: DeviceInfo | None = None,
        meter: EnergyMeter | None = None,
    ) -> None:
        self.config = config
        if config.models is None:
            raise ValueError("models: no model repository given (--models DIR or `models:` in the config)")
        self.models: dict[str, ServedModel] = {}
        """Each model name -> the version serving requests that name none."""
        self.device = device or discover_device(config.device)
        self.metrics = Metrics(component="node")
        self.cost = CostMeter(
            meter or open_meter(self.device),
            device=self.device.id,
            interval_s=config.energy_interval_s,
            idle_watts=config.idle_watts,
            on_interval=self._observe_interval,
            own_source=meter is None,
        )
        self._energy_reported: dict[str, float] = {}
        self.profiles: list[ProfileRecord] = load_profile_file(config.profile) if config.profile else []
        self.plane = DataPlane(self.models, self.cost, self.metrics)
        self.lifecycle = ModelLifecycle(
            config.models,
            self.plane,
            load=self._load_one,
            warm=self._warm,
            metrics=self.metrics,
            set_health=self._set_model_health,
            drain_timeout_s=max(config.hang_timeout_s, config.grace_seconds),
        )
        self.lifecycle.scan()
        self.port = 0
        self._loaded = threading.Event()
        self._stopping = False
        self._server: Any = None
        self._health: Any = None
        self._metrics_server: Any = None
        self._monitor_stop = threading.Event()
        self._probing: set[str] = set()

    # -------------------------------------------------------------- lifecycle

    @property
    def address(self) -> str:
        """``host:port`` clients connect to (the bound port when ``listen`` asked for 0)."""
        host = self.config.listen.rpartition(":")[0]
        host = "127.0.0.1" if host in ("0.0.0.0", "[::]", "::") else host
        return f"{host}:{self.port}"

    def is_ready(self) -> bool:
        """True once every model finished loading (failed ones included) and until stop."""
        return self._loaded.is_set() and not self._stopping

    def start(self, *, load: bool = True) -> int:
        """Bind and start serving (health NOT_SERVING); load models on a thread. Returns the port."""
        cfg = self.config
        server = create_server(max_message_bytes=cfg.max_message_bytes, max_workers=cfg.max_workers)
        inference = InferenceServicer(
            self.plane, self.metrics, is_ready=self.is_ready, lifecycle=self.lifecycle
        )
        server.add_generic_rpc_handlers((inference.handler(),))
        moesaic_pb2_grpc.add_NodeServicer_to_server(
            NodeServicer(cfg.node_id, self.device, self.plane, self.profiles), server
        )
        self._health = add_health_and_reflection(server, [INFERENCE_SERVICE, NODE_SERVICE, *self.models])
        self.port = add_port(server, cfg.listen, cfg.tls)
        server.start()
        self._server = server
        if cfg.metrics_port is not None:
            self._metrics_server = self.metrics.serve(cfg.metrics_port, host=cfg.metrics_host)
        log.info(
            "node %s listening on %s (%s), %d model(s)",
            cfg.node_id,
            self.address,
            self.device.id,
            len(self.models),
        )
        if load:
            threading.Thread(target=self.load_models, name="model-loader", daemon=True).start()
        threading.Thread(target=self._monitor, name="engine-monitor", daemon=True).start()
        if cfg.watch:
            threading.Thread(
                target=self._watch, args=(cfg.watch_interval_s,), name="repository-watch", daemon=True
            ).start()
        return self.port

    def load_models(self) -> None:
        """Load every model version, each on its own thread, and warm it up; a model goes
        SERVING as soon as it is ready, the server once all have finished loading."""
        self.lifecycle.load_initial(stopping=lambda: self._stopping)
        if self._stopping:
            return
        for name in ("", INFERENCE_SERVICE, NODE_SERVICE):
            self._health.set(name, SERVING)
        self.cost.relearn_idle()  # loading worked the device while no request ran
        self._loaded.set()

    def _load_one(self, model: ServedModel) -> None:
        if self._stopping:
            model.state, model.error = "failed", "the node is stopping"
            return
        model.load(
            self.device,
            cost=self.cost,
            on_batch=self._batch_observer(model.name),
            allow_cpu_fallback=self.config.allow_cpu_fallback,
        )
        if model.ready:
            log.info(
                "model %s version %d ready on %s (%s, %s)",
                model.name,
                model.version,
                model.device,
                model.engine_type,
                model.provider,
            )

    def _warm(self, model: ServedModel) -> None:
        """One pass through the whole request path of an unbatched model, which also calibrates
        the service time Describe reports from the start. (The engine warmed up in load; a
        batched model's engine was also run by its batchability check, and a probe through its
        batcher would wait out the batching delay.)"""
        self.plane.register(model.name)
        if model.batcher is None:
            self.plane.calibrate(model, self.config.hang_timeout_s)

    def _set_model_health(self, name: str, serving: bool) -> None:
        if self._health is not None:
            self._health.set(name, SERVING if serving else NOT_SERVING)

    def _watch(self, interval_s: float) -> None:
        self._loaded.wait()
        log.info("watching %s for new model versions every %g s", self.config.models, interval_s)
        self.lifecycle.watch(interval_s, self._monitor_stop)

    def _batch_observer(self, name: str) -> Callable[[int, int], None]:
        rows = self.metrics.batch_rows.labels(expert=name)
        requests = self.metrics.batch_requests.labels(expert=name)

        def observe(batch_rows: int, batch_requests: int) -> None:
            rows.observe(batch_rows)
            requests.observe(batch_requests)

        return observe

    def _observe_interval(self, report: IntervalReport) -> None:
        """Cost meter thread: the device's counter, idle draw and attributed energy as metrics."""
        self.plane.flush_metrics()
        m, device = self.metrics, self.device.id
        m.device_energy.labels(device=device).inc(max(report.device_joules, 0.0))
        m.device_idle_watts.labels(device=device).set(report.idle_watts)
        # Attribution of one interval may be negative (a coarse counter's step lands later);
        # the counters move by the running totals' increases, so they never go back.
        totals = self.cost.totals.attributed
        for model in report.attributed:
            total, shown = totals.get(model, 0.0), self._energy_reported.get(model, 0.0)
            if total > shown:
                m.model_energy.labels(model=model, device=device).inc(total - shown)
                self._energy_reported[model] = total

    # -------------------------------------------------------------- liveness

    def healthy(self) -> bool:
        """False once any model is hung: the systemd watchdog is then no longer fed."""
        return not any(m.state == "hung" for m in self.plane.served())

    def _monitor(self) -> None:
        """Watch engines: a call past ``hang_timeout_s`` marks its model hung (NOT_SERVING);
        a model idle for ``probe_interval_s`` gets a probe inference, so hangs show without traffic."""
        cfg = self.config
        check_s = min(1.0, cfg.hang_timeout_s / 4)
        while not self._monitor_stop.wait(check_s):
            self.plane.flush_metrics()  # also when the cost meter holds its intervals
            for model in self.plane.stalled(cfg.hang_timeout_s):
                if model.state != "ready":
                    continue
                model.state = "hung"
                model.error = f"an engine call has run for more than {cfg.hang_timeout_s:g} s"
                if self.models.get(model.name) is model:
                    self._health.set(model.name, NOT_SERVING)
                log.error("model %s is hung (%s); the watchdog is no longer fed", model.name, model.error)
            if self._loaded.is_set():
                for model in self.plane.idle_models(cfg.probe_interval_s):
                    if model.name not in self._probing:
                        self._probing.add(model.name)
                        threading.Thread(
                            target=self._probe, args=(model,), name=f"probe-{model.name}", daemon=True
                        ).start()

    def _probe(self, model: ServedModel) -> None:
        try:
            self.plane.probe(model, self.config.hang_timeout_s)
        except Exception as exc:  # a probe on zeros may be refused: only a hang matters
            log.debug("probe of %s: %s", model.name, exc)
        finally:
            self._probing.discard(model.name)

    def wait_ready(self, timeout: float | None = None) -> bool:
        """Block until models finished loading; False on timeout."""
        return self._loaded.wait(timeout)

    def stop(self, grace: float | None = None) -> None:
        """Health NOT_SERVING, refuse new calls, let in-flight ones finish, release models."""
        if self._server is None:
            return
        self._stopping = True
        self._monitor_stop.set()
        self._health.enter_graceful_shutdown()
        for model in self.plane.served():
            model.drain()  # queued requests go at once instead of waiting for company
        grace = self.config.grace_seconds if grace is None else grace
        self._server.stop(grace).wait()
        self._server = None
        self.lifecycle.wait_retired(grace)
        for model in self.plane.served():
            model.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self.cost.close()

    def __enter__(self) -> NodeServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop(grace=0)

    # -------------------------------------------------------------- service entry point

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (systemd READY, watchdog, graceful drain); exit status."""
        return asyncio.run(self._run())

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        self.start(load=False)
        async with Watchdog(healthy=self.healthy):
            notify_status("loading models")
            load: asyncio.Future[Any] = loop.run_in_executor(None, self.load_models)
            stopped: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
            await asyncio.wait([load, stopped], return_when=asyncio.FIRST_COMPLETED)
            refused = [m for m in self.plane.served() if m.error.startswith("FallbackRefused")]
            if refused and not stop.is_set():
                for model in refused:
                    log.error("model %s %s", model.name, model.error.removeprefix("FallbackRefused: "))
                notify_stopping()
                await loop.run_in_executor(None, self.stop)
                return 2
            if not stop.is_set():
                failed = sorted({m.name for m in self.models.values() if not m.ready})
                serving = len(self.models) - len(failed)
                status = f"serving {serving} model(s) on {self.address}"
                notify_ready(status + (f"; failed: {', '.join(failed)}" if failed else ""))
                if failed:
                    log.warning("%s; failed: %s", status, ", ".join(failed))
                elif serving == 0:
                    log.warning("%s: the repository %s has no model to serve", status, self.config.models)
                else:
                    log.info("%s", status)
                await stop.wait()
            notify_stopping()
            log.info(
                "stopping: health NOT_SERVING, draining in-flight requests (%.1f s)",
                self.config.grace_seconds,
            )
            await loop.run_in_executor(None, self.stop)
        return 0
