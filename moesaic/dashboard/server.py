"""The dashboard's web server (aiohttp): the page, its static files, the live event stream.

::

    async with Dashboard(load_dashboard_config(mqtt={"broker": "mqtt://127.0.0.1:1883"})) as dashboard:
        print(dashboard.url)            # http://127.0.0.1:8321/
        await stop.wait()

Routes (all GET): ``/`` the page; ``/static/...`` its script, style and font; ``/events``
server-sent events (one ``snapshot``, then a ``patch`` whenever something changed, batched
every ``push_interval_s``); ``/api/state`` the snapshot as JSON; ``/api/bev/{sensor}/{task}.png``
the latest grid PNG; ``/api/camera/{sensor}`` the camera frame shown; ``/healthz``.

Every response carries a Content-Security-Policy that allows nothing but this origin, and
requests whose Host header is not the server's own are refused (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import ssl
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from moesaic.runtime.engine import MissingExtraError

try:
    from aiohttp import web
except ImportError:
    raise MissingExtraError("aiohttp", "dashboard") from None

from moesaic.dashboard.config import DashboardConfig, MetricsEndpoint, NodeTarget, is_loopback, parse_listen
from moesaic.dashboard.sources import MqttFeed, forever, poll_coordinator, poll_metrics, poll_node
from moesaic.dashboard.state import FleetState
from moesaic.ingest.topics import validate_segment
from moesaic.rpc import TlsConfig

__all__ = ["Dashboard", "Hub", "build_app", "fleet_nodes", "server_ssl_context"]

log = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
FONT = Path(__file__).resolve().parent.parent / "assets" / "fonts" / "DejaVuSans.ttf"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; font-src 'self'; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_KEEPALIVE_S = 15.0
_MAX_CLIENTS = 64
_CLIENT_QUEUE = 64


class Hub:
    """The pages connected to ``/events``: each has a bounded queue of encoded events; a page
    that falls behind is disconnected (its browser reconnects and gets a fresh snapshot)."""

    def __init__(self, *, max_clients: int = _MAX_CLIENTS) -> None:
        self.max_clients = max_clients
        self.clients: set[asyncio.Queue[bytes | None]] = set()
        self.sent = 0

    def subscribe(self) -> asyncio.Queue[bytes | None] | None:
        if len(self.clients) >= self.max_clients:
            return None
        queue: asyncio.Queue[bytes | None] = asyncio.Queue(_CLIENT_QUEUE)
        self.clients.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.clients.discard(queue)

    def publish(self, event: bytes) -> None:
        self.sent += 1
        for queue in list(self.clients):
            try:
                queue.put_nowait(event)
            except asyncio.QueueFull:  # too slow: end its stream, it reconnects
                self.clients.discard(queue)
                with contextlib.suppress(asyncio.QueueEmpty):
                    queue.get_nowait()
                queue.put_nowait(None)

    def close(self) -> None:
        for queue in list(self.clients):
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)
        self.clients.clear()


_STATE = web.AppKey("state", FleetState)
_HUB = web.AppKey("hub", Hub)
_HOSTS: web.AppKey[frozenset[str] | None] = web.AppKey("hosts")


def sse(event: str, data: dict[str, Any]) -> bytes:
    """One server-sent event; JSON has no raw newlines, so the data is one line."""
    body = json.dumps(data, separators=(",", ":"), allow_nan=False)
    return f"event: {event}\ndata: {body}\n\n".encode()


def allowed_hosts(config: DashboardConfig) -> frozenset[str] | None:
    """Host header names accepted; None (any) when listening on every interface with no list."""
    host, _ = parse_listen(config.listen)
    names = set(config.allowed_hosts)
    if host in ("0.0.0.0", "::", ""):
        if not names:
            return None
        host = "127.0.0.1"  # every interface: this machine's own names stay allowed
    names.add(host)
    if is_loopback(host):
        names.update({"127.0.0.1", "localhost", "::1"})
    return frozenset(names)


def _host_name(header: str) -> str:
    if header.startswith("["):
        return header[1:].partition("]")[0]
    return header.rpartition(":")[0] if header.count(":") == 1 else header


@web.middleware
async def _guard(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    hosts = request.app[_HOSTS]
    if hosts is not None and _host_name(request.headers.get("Host", "")) not in hosts:
        return web.Response(status=421, text="host not served here\n")
    try:
        response = await handler(request)
    except web.HTTPException as exc:  # 404 and friends carry the same headers
        _secure(exc.headers)
        raise
    _secure(response.headers)
    return response


def _secure(headers: Any) -> None:
    headers.setdefault("Content-Security-Policy", CSP)
    headers.setdefault("X-Content-Type-Options", "nosniff")
    headers.setdefault("Referrer-Policy", "no-referrer")
    headers.setdefault("X-Frame-Options", "DENY")
    headers.setdefault("Cache-Control", "no-store")


async def _index(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(STATIC / "index.html", headers={"Content-Type": "text/html; charset=utf-8"})


async def _font(request: web.Request) -> web.StreamResponse:
    return web.FileResponse(FONT, headers={"Content-Type": "font/ttf", "Cache-Control": "max-age=86400"})


async def _state(request: web.Request) -> web.StreamResponse:
    snapshot = request.app[_STATE].snapshot(now=time.time())
    return web.json_response(snapshot, dumps=lambda d: json.dumps(d, allow_nan=False))


async def _bev(request: web.Request) -> web.StreamResponse:
    try:
        sensor = validate_segment(request.match_info["sensor"], "sensor")
        task = validate_segment(request.match_info["task"], "task")
    except ValueError:
        raise web.HTTPNotFound() from None
    data = request.app[_STATE].grid_png(sensor, task)
    if data is None:
        raise web.HTTPNotFound()
    return web.Response(body=data, content_type="image/png")


async def _camera(request: web.Request) -> web.StreamResponse:
    try:
        sensor = validate_segment(request.match_info["sensor"], "sensor")
    except ValueError:
        raise web.HTTPNotFound() from None
    found = request.app[_STATE].camera_image(sensor)
    if found is None:
        raise web.HTTPNotFound()
    data, content_type = found
    return web.Response(body=data, content_type=content_type)


async def _healthz(request: web.Request) -> web.StreamResponse:
    return web.Response(text="ok\n")


async def _events(request: web.Request) -> web.StreamResponse:
    hub = request.app[_HUB]
    queue = hub.subscribe()
    if queue is None:
        raise web.HTTPServiceUnavailable(text="too many pages connected\n")
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    )
    try:
        await response.prepare(request)
        await response.write(
            b"retry: 2000\n\n" + sse("snapshot", request.app[_STATE].snapshot(now=time.time()))
        )
        while True:
            try:
                event = await asyncio.wait_for(queue.get(), _KEEPALIVE_S)
            except TimeoutError:
                await response.write(b": keepalive\n\n")
                continue
            if event is None:
                break
            await response.write(event)
    except (ConnectionResetError, ConnectionError):
        pass
    finally:
        hub.unsubscribe(queue)
    return response


def build_app(state: FleetState, hub: Hub, *, hosts: frozenset[str] | None) -> web.Application:
    """The aiohttp application over ``state``; events come from ``hub``."""
    app = web.Application(middlewares=[_guard], client_max_size=64 * 1024)
    app[_STATE] = state
    app[_HUB] = hub
    app[_HOSTS] = hosts
    app.router.add_get("/", _index)
    app.router.add_get("/events", _events)
    app.router.add_get("/api/state", _state)
    app.router.add_get("/api/bev/{sensor}/{task}.png", _bev)
    app.router.add_get("/api/camera/{sensor}", _camera)
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/static/fonts/DejaVuSans.ttf", _font)
    app.router.add_static("/static/", STATIC, follow_symlinks=False, append_version=False)
    return app


def server_ssl_context(tls: TlsConfig) -> ssl.SSLContext:
    """HTTPS from ``cert`` + ``key``; with ``client_ca`` clients must present a certificate it signed.
    Relative paths are looked up in ``$CREDENTIALS_DIRECTORY`` first, as for the gRPC servers."""
    if tls.cert is None or tls.key is None:
        raise ValueError("tls: the dashboard needs cert and key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(_credential(tls.cert), _credential(tls.key))
        if tls.client_ca is not None:
            context.load_verify_locations(cafile=_credential(tls.client_ca))
            context.verify_mode = ssl.CERT_REQUIRED
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"tls: {exc}") from None
    return context


def _credential(path: Path) -> str:
    import os

    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if not path.is_absolute() and creds and (Path(creds) / path).exists():
        return str(Path(creds) / path)
    return str(path)


def fleet_nodes(config: DashboardConfig) -> list[NodeTarget]:
    """The nodes to describe: those of ``config.fleet`` (names and TLS as the coordinator uses
    them), then ``config.nodes``; one per address."""
    targets: dict[str, NodeTarget] = {}
    if config.fleet is not None:
        from moesaic.coordinator.config import load_fleet

        for entry in load_fleet(config.fleet).nodes:
            targets[entry.address] = NodeTarget(address=entry.address, name=entry.name, tls=entry.tls)
    for target in config.nodes:
        targets[target.address] = target
    return list(targets.values())


class Dashboard:
    """The web server and its sources, as one async context manager; ``url`` once entered."""

    def __init__(self, config: DashboardConfig, *, state: FleetState | None = None) -> None:
        self.config = config
        self.state = state or FleetState(history_s=config.history_s)
        self.hub = Hub()
        self.feed = MqttFeed(config, self.state)
        self.port = 0
        self._runner: web.AppRunner | None = None
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        host, _ = parse_listen(self.config.listen)
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        shown = f"[{host}]" if ":" in host else host
        return f"{self.config.scheme}://{shown}:{self.port}/"

    async def __aenter__(self) -> Dashboard:
        nodes = fleet_nodes(self.config)  # a bad fleet file fails here, before anything starts
        context = server_ssl_context(self.config.tls) if self.config.tls else None
        host, port = parse_listen(self.config.listen)
        app = build_app(self.state, self.hub, hosts=allowed_hosts(self.config))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        site = web.TCPSite(runner, host, port, ssl_context=context, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            raise OSError(f"dashboard: cannot listen on {self.config.listen}: {exc.strerror}") from None
        self._runner = runner
        self.port = int(runner.addresses[0][1]) if runner.addresses else port
        self._spawn("mqtt", self.feed.run)
        self._spawn("push", self._push)
        for target in nodes:
            self.add_node(target.address, name=target.name, tls=target.tls)
        for endpoint in self.config.metrics:
            self.add_metrics(endpoint.url, name=endpoint.name)
        if self.config.coordinator:
            self.add_coordinator(self.config.coordinator, tls=self.config.coordinator_tls)
        return self

    # Sources known only once the dashboard runs (the demo starts it before its fleet):

    def add_node(self, address: str, *, name: str | None = None, tls: TlsConfig | None = None) -> None:
        """Describe the node at ``address`` from now on (shown as ``name``, else its node_id)."""
        target = NodeTarget(address=address, name=name, tls=tls)
        interval = self.config.poll_interval_s
        self._spawn(f"node {address}", partial(poll_node, target, self.state, interval_s=interval))

    def add_metrics(self, url: str, *, name: str | None = None) -> None:
        """Scrape the Prometheus endpoint ``url`` from now on (shown as ``name``, else HOST:PORT)."""
        endpoint = MetricsEndpoint(url=url, name=name)
        interval = self.config.poll_interval_s
        self._spawn(f"metrics {url}", partial(poll_metrics, endpoint, self.state, interval_s=interval))

    def add_coordinator(self, address: str, *, tls: TlsConfig | None = None) -> None:
        """Watch the coordinator's ``grpc.health.v1`` at ``address`` from now on."""
        interval = self.config.poll_interval_s
        poll = partial(poll_coordinator, address, self.state, interval_s=interval, tls=tls)
        self._spawn("coordinator", poll)

    def _spawn(self, name: str, loop: Callable[[], Awaitable[None]]) -> None:
        if self._runner is None:
            raise RuntimeError("the dashboard is not running: use `async with Dashboard(...)` first")
        self._tasks.append(asyncio.create_task(forever(name, loop), name=f"dashboard {name}"))

    async def _push(self) -> None:
        while True:
            await asyncio.sleep(self.config.push_interval_s)
            patch = self.state.drain(now=time.time())
            if patch is not None:
                self.hub.publish(sse("patch", patch))

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        self._tasks.clear()
        self.hub.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
