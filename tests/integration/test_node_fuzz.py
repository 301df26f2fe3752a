"""Whatever bytes a client sends, the node answers with the client's fault or a result, never a
crash: mutated ModelInfer requests (property-based) and bad point clouds, against a real node."""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from moesaic.nodes.codec import decode_response, encode_request
from moesaic.nodes.server import NodeServer
from tests.helpers.nodes import running_node
from tests.helpers.onnx_models import write_identity_model

INFER = "/inference.GRPCInferenceService/ModelInfer"
CLIENT_FAULTS = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SEEDS = [
    encode_request("add", {"x": np.arange(8, dtype=np.float32).reshape(2, 4)}),
    encode_request("add", {"x": np.ones((1, 4), np.float32)}, outputs=["total"], parameters={"k": "v"}),
    encode_request("echo", {"x_int64": np.arange(3, dtype=np.int64).reshape(1, 3)}),
]


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A valid request with a few bytes flipped, cut, inserted or repeated."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "truncate", "duplicate"]))
        at = draw(st.integers(0, max(len(data) - 1, 0)))
        if kind == "flip" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "truncate":
            del data[at:]
        else:
            data[at:at] = data[at : at + draw(st.integers(1, 32))]
    return bytes(data)


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(request=mutated())
def test_mutated_requests_never_get_internal_or_unknown(node: NodeServer, request: bytes) -> None:
    with grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        try:
            call(request, timeout=10)
        except grpc.RpcError as exc:
            assert exc.code() in CLIENT_FAULTS, (exc.code(), exc.details(), request)
            assert "Traceback" not in (exc.details() or "") and len(exc.details() or "") <= 1024


def test_node_still_serves_after_the_fuzzing(node: NodeServer) -> None:
    with grpc.insecure_channel(node.address) as channel:
        _, outputs = decode_response(channel.unary_unary(INFER)(SEEDS[0], timeout=10))
    assert outputs["y"].tolist() == (np.arange(8, dtype=np.float32).reshape(2, 4) + 1).tolist()


def test_a_huge_model_name_is_not_found_and_not_echoed(node: NodeServer) -> None:
    with grpc.insecure_channel(node.address) as channel, pytest.raises(grpc.RpcError) as info:
        channel.unary_unary(INFER)(
            encode_request("m" * 20_000, {"x": np.ones((1, 4), np.float32)}), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.NOT_FOUND
    assert len(info.value.details() or "") < 400 and "20000 chars" in (info.value.details() or "")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_point_clouds_must_be_finite(tmp_path: Path, bad: float) -> None:
    write_identity_model(tmp_path, "pts", [("points", "FP32", (-1, 4))])
    points = np.ones((5, 4), np.float32)
    points[3, 1] = bad
    with running_node(tmp_path) as node, grpc.insecure_channel(node.address) as channel:
        call = channel.unary_unary(INFER)
        with pytest.raises(grpc.RpcError) as info:
            call(encode_request("pts", {"points": points}), timeout=10)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "NaN or infinite" in (info.value.details() or "")
        points[3, 1] = 0.0  # the same request, finite: served (the fast path checks values too)
        call(encode_request("pts", {"points": points}), timeout=10)
        points[0, 0] = bad
        with pytest.raises(grpc.RpcError):
            call(encode_request("pts", {"points": points}), timeout=10)
