"""A real node on loopback: KServe v2 calls, errors, health, reflection, Describe, cost parameters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moesaic.nodes.client import NodeClient
from moesaic.nodes.codec import encode_request
from moesaic.nodes.config import load_node_config
from moesaic.nodes.server import NodeServer
from moesaic.proto import inference_pb2, inference_pb2_grpc
from tests.helpers.nodes import running_node
from tests.helpers.onnx_models import write_add_model

VALUES = {
    "FP32": np.array([[0.5, -1.0, 3.25]] * 2, np.float32),
    "FP16": np.array([[0.5, -1.0, 3.25]] * 2, np.float16),
    "INT64": np.array([[2**40, -1, 0]] * 2, np.int64),
    "INT32": np.array([[7, -1, 0]] * 2, np.int32),
    "UINT8": np.array([[0, 1, 255]] * 2, np.uint8),
    "BOOL": np.array([[True, False, True]] * 2),
    "BYTES": np.array([[b"a", b"bc", b""]] * 2, dtype=object),
}


def _echo_inputs(batch: int) -> dict[str, np.ndarray]:
    return {f"x_{t.lower()}": np.concatenate([v] * batch)[:batch] for t, v in VALUES.items()}


@pytest.mark.parametrize("batch", [1, 2, 5])
async def test_every_datatype_round_trips(node: NodeServer, batch: int) -> None:
    inputs = _echo_inputs(batch)
    async with NodeClient(node.address) as client:
        result = await client.infer("echo", inputs, timeout=10)
    assert sorted(result.outputs) == sorted(f"{k}_out" for k in inputs)
    for name, array in inputs.items():
        got = result.outputs[f"{name}_out"]
        assert got.dtype == array.dtype and got.shape == array.shape
        np.testing.assert_array_equal(got, array)
    assert result.compute_ms > 0 and result.energy_mj >= 0
    assert result.energy_source in ("rapl+attributed", "estimate+attributed")


async def test_requested_outputs_and_parameters(node: NodeServer) -> None:
    async with NodeClient(node.address) as client:
        result = await client.infer(
            "add",
            {"x": np.ones((3, 4), np.float32)},
            outputs=["total"],
            parameters={"sensor_id": "s"},
            request_id="r7",
            timeout=10,
        )
    assert list(result.outputs) == ["total"] and float(result.outputs["total"]) == 12.0
    assert result.request_id == "r7"
    assert set(result.parameters) == {
        "compute_ms",
        "queue_ms",
        "energy_mj",
        "energy_source",
        "queue_depth",
        "expected_wait_ms",
    }


def _stub(node: NodeServer) -> Any:
    return inference_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(node.address))


def test_typed_contents_input(node: NodeServer) -> None:
    req = inference_pb2.ModelInferRequest(model_name="add")
    tensor = req.inputs.add(name="x", datatype="FP32", shape=[1, 4])
    tensor.contents.fp32_contents.extend([1, 2, 3, 4])
    reply = _stub(node).ModelInfer(req, timeout=10)
    names = [o.name for o in reply.outputs]
    y = np.frombuffer(reply.raw_output_contents[names.index("y")], np.float32)
    np.testing.assert_array_equal(y, [2, 3, 4, 5])
    assert reply.parameters["energy_source"].string_param


def test_control_plane(node: NodeServer) -> None:
    stub = _stub(node)
    assert stub.ServerLive(inference_pb2.ServerLiveRequest()).live
    assert stub.ServerReady(inference_pb2.ServerReadyRequest()).ready
    assert stub.ModelReady(inference_pb2.ModelReadyRequest(name="add")).ready
    meta = stub.ModelMetadata(inference_pb2.ModelMetadataRequest(name="add"))
    assert meta.platform == "onnxruntime_onnx"
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("x", "FP32", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("y", "FP32", [-1, 4]),
        ("total", "FP32", []),
    ]
    assert stub.ServerMetadata(inference_pb2.ServerMetadataRequest()).name == "moesaic"


def _raw_request(model: str, name: str, datatype: str, shape: list[int], raw: bytes) -> bytes:
    req = inference_pb2.ModelInferRequest(model_name=model)
    req.inputs.add(name=name, datatype=datatype, shape=shape)
    req.raw_input_contents.append(raw)
    return req.SerializeToString()


F32x4 = np.zeros((1, 4), np.float32).tobytes()


@pytest.mark.parametrize(
    ("request_bytes", "code", "message"),
    [
        (
            _raw_request("nope", "x", "FP32", [1, 4], F32x4),
            grpc.StatusCode.NOT_FOUND,
            "model 'nope' not found",
        ),
        (
            _raw_request("add", "z", "FP32", [1, 4], F32x4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'z': model 'add' has no such input; expected ['x']",
        ),
        (
            _raw_request("add", "x", "INT32", [1, 4], F32x4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': datatype INT32; expected FP32",
        ),
        (
            _raw_request("add", "x", "FP32", [1, 5], F32x4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': shape [1, 5]; expected [-1, 4]",
        ),
        (
            _raw_request("add", "x", "FP32", [4], F32x4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': shape [4]; expected [-1, 4]",
        ),
        (
            _raw_request("add", "x", "FP32", [2, 4], F32x4),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': raw content is 16 bytes; shape [2, 4] of FP32 needs 32",
        ),
        (
            _raw_request("add", "x", "FP32", [9, 4], bytes(144)),
            grpc.StatusCode.INVALID_ARGUMENT,
            "input 'x': batch 9 exceeds max_batch_size 8",
        ),
        (
            inference_pb2.ModelInferRequest(model_name="add").SerializeToString(),
            grpc.StatusCode.INVALID_ARGUMENT,
            "inputs ['x'] missing",
        ),
        (
            encode_request("add", {"x": np.zeros((1, 4), np.float32)}, outputs=["w"]),
            grpc.StatusCode.INVALID_ARGUMENT,
            "output 'w'",
        ),
        (b"\x0a\x05ab", grpc.StatusCode.INVALID_ARGUMENT, "malformed message"),
    ],
    ids=[
        "unknown-model",
        "input-name",
        "datatype",
        "shape",
        "rank",
        "byte-length",
        "batch",
        "missing",
        "output-name",
        "malformed",
    ],
)
def test_bad_requests_name_the_problem_and_node_keeps_serving(
    node: NodeServer, request_bytes: bytes, code: grpc.StatusCode, message: str
) -> None:
    with grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as info:
            call(request_bytes, timeout=10)
        assert info.value.code() == code
        assert message in info.value.details()
        good = call(_raw_request("add", "x", "FP32", [1, 4], F32x4), timeout=10)
    assert inference_pb2.ModelInferResponse.FromString(good).model_name == "add"


async def test_oversize_is_resource_exhausted(node: NodeServer) -> None:
    big = np.zeros((600_000, 4), np.float32)  # 9.6 MB > the fixture's 8 MiB limit
    async with NodeClient(node.address, max_message_bytes=64 << 20) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.infer("add", {"x": big}, timeout=10)
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert await client.ready(timeout=5)


async def test_describe(node: NodeServer) -> None:
    async with NodeClient(node.address) as client:
        desc = await client.describe(timeout=5)
    assert desc.device.kind == "cpu" and desc.device.id == "cpu" and desc.device.energy_source
    models = {m.name: m for m in desc.models}
    assert set(models) == {"add", "echo"}
    assert (
        models["add"].task == "test"
        and models["add"].state == "ready"
        and models["add"].engine == "onnxruntime"
    )


def test_health_check_and_reflection(node: NodeServer) -> None:
    with grpc.insecure_channel(node.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "moesaic.v1.Node", "add"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = refl.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        names = {s.name for r in replies for s in r.list_services_response.service}
    assert {"inference.GRPCInferenceService", "moesaic.v1.Node", "grpc.health.v1.Health"} <= names


def test_health_not_serving_while_models_load(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    node = NodeServer(load_node_config(env={}, overrides={"listen": "127.0.0.1:0", "models": tmp_path}))
    node.start(load=False)
    try:
        with grpc.insecure_channel(node.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            watch = health.Watch(health_pb2.HealthCheckRequest(service="add"), timeout=20)
            assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
            assert (
                health.Check(health_pb2.HealthCheckRequest(), timeout=5).status
                == health_pb2.HealthCheckResponse.NOT_SERVING
            )
            stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
            assert not stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=5).ready
            with pytest.raises(grpc.RpcError) as info:
                stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="add"), timeout=5)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in info.value.details()
            node.load_models()
            assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
            watch.cancel()
            assert stub.ServerReady(inference_pb2.ServerReadyRequest(), timeout=5).ready
    finally:
        node.stop(grace=0)


def test_failed_model_is_reported_and_others_serve(tmp_path: Path) -> None:
    write_add_model(tmp_path, "add")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.onnx").write_bytes(b"garbage")
    with running_node(tmp_path) as node, grpc.insecure_channel(node.address) as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert not stub.ModelReady(inference_pb2.ModelReadyRequest(name="broken"), timeout=5).ready
        assert stub.ModelReady(inference_pb2.ModelReadyRequest(name="add"), timeout=5).ready
        with pytest.raises(grpc.RpcError) as info:
            stub.ModelInfer(inference_pb2.ModelInferRequest(model_name="broken"), timeout=5)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "failed" in info.value.details()
