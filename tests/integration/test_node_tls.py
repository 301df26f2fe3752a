"""TLS and mutual TLS with certificates the test makes: authenticated clients work, others are refused."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from moesaic.nodes.client import NodeClient
from moesaic.nodes.server import NodeServer
from moesaic.rpc import TlsConfig
from tests.helpers.certs import Certificates, make_certificates, openssl_available
from tests.helpers.nodes import running_node

pytestmark = pytest.mark.skipif(not openssl_available(), reason="needs the openssl CLI")


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    return make_certificates(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def mtls_node(model_repo: Path, certs: Certificates) -> Iterator[NodeServer]:
    tls = {"cert": certs.server_cert, "key": certs.server_key, "client_ca": certs.ca}
    with running_node(model_repo, tls=tls) as node:
        yield node


X = {"x": np.ones((1, 4), np.float32)}


async def test_tls_without_client_auth(model_repo: Path, certs: Certificates) -> None:
    with running_node(model_repo, tls={"cert": certs.server_cert, "key": certs.server_key}) as node:
        async with NodeClient(node.address, tls=TlsConfig(ca=certs.ca)) as client:
            result = await client.infer("add", X, timeout=10)
        np.testing.assert_array_equal(result.outputs["y"], X["x"] + 1)
        async with NodeClient(node.address) as plaintext:  # a plaintext client cannot talk to it
            assert not await plaintext.ready(timeout=3)
        async with NodeClient(node.address, tls=TlsConfig(ca=certs.other_ca)) as wrong_ca:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await wrong_ca.infer("add", X, timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_mutual_tls_accepts_client_certificate(mtls_node: NodeServer, certs: Certificates) -> None:
    tls = TlsConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key)
    async with NodeClient(mtls_node.address, tls=tls) as client:
        result = await client.infer("add", X, timeout=10)
        assert float(result.outputs["total"]) == 4.0


async def test_mutual_tls_refuses_unauthenticated_client(mtls_node: NodeServer, certs: Certificates) -> None:
    async with NodeClient(mtls_node.address, tls=TlsConfig(ca=certs.ca)) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("add", X, timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert not await client.ready(timeout=3)


async def test_server_name_override(mtls_node: NodeServer, certs: Certificates) -> None:
    port = mtls_node.address.rpartition(":")[2]
    tls = TlsConfig(ca=certs.ca, cert=certs.client_cert, key=certs.client_key, server_name="localhost")
    async with NodeClient(f"127.0.0.1:{port}", tls=tls) as client:
        assert await client.ready(timeout=5)
