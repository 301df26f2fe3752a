"""The dashboard's web server on loopback: routes, headers, Host checks, TLS; its config."""

from __future__ import annotations

import json
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from moesaic.dashboard.commands import register
from moesaic.dashboard.config import (
    load_dashboard_config,
    parse_listen,
    parse_metrics_endpoint,
    parse_node_target,
)
from moesaic.dashboard.server import CSP, Dashboard, Hub, allowed_hosts, build_app, sse
from moesaic.dashboard.state import FleetState
from tests.helpers.certs import make_certificates, openssl_available


@pytest.fixture
async def served() -> AsyncIterator[tuple[str, FleetState, Hub]]:
    state, hub = FleetState(), Hub()
    config = load_dashboard_config(listen="127.0.0.1:0")
    runner = web.AppRunner(build_app(state, hub, hosts=allowed_hosts(config)), shutdown_timeout=1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", state, hub
    finally:
        hub.close()
        await runner.cleanup()


async def test_page_and_static_files_carry_a_strict_policy(served: tuple[str, FleetState, Hub]) -> None:
    url, _, _ = served
    async with aiohttp.ClientSession() as session:
        for path, kind in (
            ("/", "text/html"),
            ("/static/dashboard.js", "javascript"),
            ("/static/dashboard.css", "text/css"),
            ("/static/fonts/DejaVuSans.ttf", "font/ttf"),
            ("/static/favicon.svg", "image/svg+xml"),
        ):
            async with session.get(url + path) as response:
                assert response.status == 200, path
                assert kind in response.headers["Content-Type"], path
                assert response.headers["Content-Security-Policy"] == CSP
                assert response.headers["X-Content-Type-Options"] == "nosniff"
        async with session.get(url + "/static/../server.py") as response:
            assert response.status in (403, 404)
        async with session.get(url + "/api/bev/roof/bev_segmentation.png") as response:
            assert response.status == 404
            assert response.headers["Content-Security-Policy"] == CSP


def test_the_page_loads_nothing_from_elsewhere_and_never_uses_inner_html() -> None:
    static = Path(__file__).resolve().parents[3] / "moesaic" / "dashboard" / "static"
    for path in static.iterdir():
        text = path.read_text()
        assert "http://" not in text.replace("http://www.w3.org/2000/svg", ""), path.name
        assert "https://" not in text and "//cdn" not in text, path.name
        assert "innerHTML" not in text.replace("innerHTML is never used", ""), path.name
        assert "eval(" not in text and "document.write" not in text, path.name


async def test_other_host_names_are_refused(served: tuple[str, FleetState, Hub]) -> None:
    url, _, _ = served
    async with aiohttp.ClientSession() as session:
        async with session.get(url + "/", headers={"Host": "evil.example:8321"}) as response:
            assert response.status == 421
        for host in ("localhost:8321", "127.0.0.1"):
            async with session.get(url + "/healthz", headers={"Host": host}) as response:
                assert response.status == 200, host


@pytest.mark.parametrize(
    ("listen", "extra", "expected"),
    [
        ("127.0.0.1:8321", (), {"127.0.0.1", "localhost", "::1"}),
        ("10.0.0.5:8321", ("dash.local",), {"10.0.0.5", "dash.local"}),
        ("0.0.0.0:8321", (), None),
        ("0.0.0.0:8321", ("dash.local",), {"dash.local", "127.0.0.1", "localhost", "::1"}),
    ],
)
def test_allowed_hosts(listen: str, extra: tuple[str, ...], expected: set[str] | None) -> None:
    config = load_dashboard_config(listen=listen, allowed_hosts=extra)
    assert allowed_hosts(config) == (None if expected is None else frozenset(expected))


async def test_events_start_with_a_snapshot_then_patches(served: tuple[str, FleetState, Hub]) -> None:
    url, state, hub = served
    state.on_message("moesaic/v1/status/ingest", b"online", now=1.0)
    async with aiohttp.ClientSession() as session, session.get(url + "/events") as response:
        assert response.headers["Content-Type"].startswith("text/event-stream")
        assert await response.content.readuntil(b"\n\n") == b"retry: 2000\n\n"
        event = await response.content.readuntil(b"\n\n")
        assert event.startswith(b"event: snapshot\ndata: ")
        snapshot = json.loads(event.split(b"data: ", 1)[1])
        assert snapshot["components"][0]["status"] == "online"
        hub.publish(sse("patch", {"type": "patch", "nodes": []}))
        event = await response.content.readuntil(b"\n\n")
        assert event == b'event: patch\ndata: {"type":"patch","nodes":[]}\n\n'


def test_a_page_that_falls_behind_is_disconnected() -> None:
    hub = Hub()
    queue = hub.subscribe()
    assert queue is not None
    for _ in range(200):
        hub.publish(b"event: patch\ndata: {}\n\n")
    assert queue not in hub.clients
    items = [queue.get_nowait() for _ in range(queue.qsize())]
    assert items[-1] is None  # the stream ends; the browser reconnects for a fresh snapshot


async def test_https_and_mutual_tls(tmp_path: Path) -> None:
    if not openssl_available():
        pytest.skip("openssl is not installed")
    certs = make_certificates(tmp_path)
    config = load_dashboard_config(
        listen="127.0.0.1:0",
        mqtt={"broker": "mqtt://127.0.0.1:1"},  # nothing there: the page still serves
        tls={"cert": certs.server_cert, "key": certs.server_key},
    )
    async with Dashboard(config) as dashboard:
        assert dashboard.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(certs.ca))
        async with aiohttp.ClientSession() as session, session.get(dashboard.url, ssl=context) as response:
            assert response.status == 200
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorCertificateError):
                await session.get(dashboard.url)  # not trusted without the CA
    mutual = config.model_copy(update={"tls": config.tls.model_copy(update={"client_ca": certs.ca})})
    async with Dashboard(mutual) as dashboard:
        context = ssl.create_default_context(cafile=str(certs.ca))
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientError):  # no client certificate
                await session.get(dashboard.url, ssl=context)
        context.load_cert_chain(certs.client_cert, certs.client_key)
        async with aiohttp.ClientSession() as session, session.get(dashboard.url, ssl=context) as response:
            assert response.status == 200


def test_command_line_values() -> None:
    assert parse_listen("[::1]:8321") == ("::1", 8321)
    for bad in ("8321", "host:", "host:99999"):
        with pytest.raises(ValueError):
            parse_listen(bad)
    assert parse_node_target("127.0.0.1:8001").name is None
    assert parse_node_target("edge-a=127.0.0.1:8001").name == "edge-a"
    endpoint = parse_metrics_endpoint("http://127.0.0.1:9100/metrics?x=1")
    assert endpoint.name is None and endpoint.label == "127.0.0.1:9100"
    with pytest.raises(ValueError, match="http"):
        parse_metrics_endpoint("edge=ftp://127.0.0.1/metrics")
    with pytest.raises(ValueError, match="listen"):
        load_dashboard_config(listen="nowhere")
    import argparse

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["dashboard", "--node", "a=127.0.0.1:1", "--node", "127.0.0.1:2"])
    assert args.node == ["a=127.0.0.1:1", "127.0.0.1:2"] and args.listen is None
