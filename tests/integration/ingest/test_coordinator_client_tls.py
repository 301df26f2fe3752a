"""The bridge's coordinator client over mutual TLS, against the real coordinator server."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.coordinator.config import parse_fleet
from moesaic.coordinator.service import serve
from moesaic.ingest.config import load_config
from moesaic.ingest.coordinator_client import CoordinatorClient
from tests.helpers.certs import make_certificates, openssl_available
from tests.helpers.nodes import running_node
from tests.integration.test_coordinator_perceive import FEATURES, write_classifier, x_request

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl CLI")


async def test_the_bridge_reaches_a_tls_coordinator_only_with_its_client_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    write_classifier(tmp_path / "models", "cls-a", seed=1)
    with running_node(tmp_path / "models") as node:
        tls = {"cert": str(certs.server_cert), "key": str(certs.server_key), "client_ca": str(certs.ca)}
        config = parse_fleet(
            {"coordinator": {"tls": tls}, "nodes": [{"address": node.address, "name": "n0"}]}, env={}
        )
        ready, bound = asyncio.Event(), []
        server = asyncio.create_task(
            serve(config, "127.0.0.1:0", ready=ready, bound=bound, handle_signals=False)
        )
        try:
            await asyncio.wait_for(ready.wait(), 30)
            client_tls = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}
            ingest = load_config(coordinator=f"127.0.0.1:{bound[0]}", coordinator_tls=client_tls)
            assert ingest.coordinator_tls is not None
            async with CoordinatorClient(ingest.coordinator, tls=ingest.coordinator_tls) as client:
                reply = await client.perceive(x_request(np.zeros(FEATURES)))
            assert [e.expert_id for e in reply.experts] == ["cls-a"]
            without = ingest.coordinator_tls.model_copy(update={"cert": None, "key": None})
            async with CoordinatorClient(ingest.coordinator, tls=without, timeout_s=5) as client:
                with pytest.raises(grpc.aio.AioRpcError):
                    await client.perceive(x_request(np.zeros(FEATURES)))
        finally:
            server.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await server
