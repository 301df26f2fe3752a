"""Codec: numpy <-> KServe v2 wire bytes, without copies, identical to protobuf's encoding."""

from __future__ import annotations

import numpy as np
import pytest

from moesaic.nodes.codec import (
    ReplyWriter,
    decode_request,
    decode_response,
    decode_tensor,
    deserialize_bytes_tensor,
    encode_request,
    encode_response,
    serialize_bytes_tensor,
    tensor_from_contents,
    tensor_to_contents,
)
from moesaic.nodes.wire import RAW_INPUT_FIELD, RAW_OUTPUT_FIELD, raw_spans, split_message
from moesaic.proto import inference_pb2

ARRAYS: dict[str, np.ndarray] = {
    "FP32": np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
    "FP16": np.arange(6, dtype=np.float16).reshape(2, 3) / 3,
    "FP64": np.linspace(0, 1, 6).reshape(2, 3),
    "INT64": np.array([[-(2**40), 0, 2**40]], dtype=np.int64),
    "INT32": np.array([[-7, 0, 7]], dtype=np.int32),
    "UINT8": np.array([[0, 128, 255]], dtype=np.uint8),
    "BOOL": np.array([[True, False, True]]),
    "BYTES": np.array([[b"a", b"", "\u00e9".encode()]], dtype=object),
}


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_request_round_trip(datatype: str) -> None:
    array = ARRAYS[datatype]
    data = encode_request(
        "m", {"t": array, "other": np.zeros(2, np.int32)}, parameters={"sensor_id": "s1", "k": 3}
    )
    header, raws = decode_request(data)
    assert header.model_name == "m"
    assert [t.datatype for t in header.inputs] == [datatype, "INT32"]
    assert header.parameters["sensor_id"].string_param == "s1" and header.parameters["k"].int64_param == 3
    got = decode_tensor("t", datatype, tuple(header.inputs[0].shape), raws[0])
    np.testing.assert_array_equal(got, array)
    # Same bytes as protobuf would produce: protobuf parses our encoding identically.
    parsed = inference_pb2.ModelInferRequest.FromString(data)
    assert list(parsed.raw_input_contents) == [bytes(r) for r in raws]


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_response_round_trip(datatype: str) -> None:
    data = encode_response(
        "m", {"out": ARRAYS[datatype]}, parameters={"compute_ms": 1.5, "energy_source": "rapl"}
    )
    header, outputs = decode_response(data)
    np.testing.assert_array_equal(outputs["out"], ARRAYS[datatype])
    assert header.parameters["compute_ms"].double_param == 1.5
    assert header.parameters["energy_source"].string_param == "rapl"


def test_decode_is_a_view_of_the_request_bytes() -> None:
    array = np.random.default_rng(0).random((512, 512), dtype=np.float32)  # 1 MiB
    data = encode_request("m", {"x": array})
    _, raws = decode_request(data)
    got = decode_tensor("x", "FP32", array.shape, raws[0])
    assert np.shares_memory(got, np.frombuffer(data, np.uint8))
    assert not got.flags.writeable


def test_raw_fields_anywhere_in_the_message() -> None:
    """Protobuf allows any field order; the header may come after the tensors."""
    req = inference_pb2.ModelInferRequest(model_name="m", id="r1")
    req.inputs.add(name="x", datatype="INT32", shape=[2])
    req.raw_input_contents.append(np.array([5, 6], np.int32).tobytes())
    tensors = inference_pb2.ModelInferRequest(raw_input_contents=req.raw_input_contents).SerializeToString()
    rest = inference_pb2.ModelInferRequest(model_name="m", id="r1", inputs=req.inputs).SerializeToString()
    header, raws = split_message(tensors + rest, RAW_INPUT_FIELD)
    parsed = inference_pb2.ModelInferRequest.FromString(header)
    assert parsed.model_name == "m" and parsed.id == "r1" and not parsed.raw_input_contents
    np.testing.assert_array_equal(decode_tensor("x", "INT32", (2,), raws[0]), [5, 6])


@pytest.mark.parametrize(
    "data",
    [b"\x0a\x05ab", b"\x0a", b"\x3a\xff\xff\xff\xff\x0f", b"\x0f"],
    ids=["field-past-end", "truncated-length", "huge-length", "bad-wire-type"],
)
def test_malformed_messages_are_value_errors(data: bytes) -> None:
    with pytest.raises(ValueError, match="malformed"):
        split_message(data, RAW_INPUT_FIELD)


@pytest.mark.parametrize(
    ("datatype", "shape", "nbytes", "match"),
    [
        ("FP32", (2, 3), 20, "raw content is 20 bytes; shape \\[2, 3\\] of FP32 needs 24"),
        ("INT64", (1,), 4, "raw content is 4 bytes; shape \\[1\\] of INT64 needs 8"),
        ("NOPE", (1,), 4, "unknown datatype 'NOPE'"),
    ],
)
def test_decode_tensor_names_the_problem(
    datatype: str, shape: tuple[int, ...], nbytes: int, match: str
) -> None:
    with pytest.raises(ValueError, match=f"input 'x': {match}"):
        decode_tensor("x", datatype, shape, bytes(nbytes))


def test_bytes_tensor_uses_kserve_length_prefix() -> None:
    encoded = serialize_bytes_tensor(np.array([b"ab", "c"], dtype=object))
    assert encoded == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"
    np.testing.assert_array_equal(deserialize_bytes_tensor(encoded, (2,)), [b"ab", b"c"])
    with pytest.raises(ValueError, match="holds 2 elements; shape \\[3\\] needs 3"):
        deserialize_bytes_tensor(encoded, (3,), "x")
    with pytest.raises(ValueError, match="runs past the end"):
        deserialize_bytes_tensor(b"\x09\x00\x00\x00ab", (1,), "x")


@pytest.mark.parametrize("datatype", ["FP32", "INT64", "INT32", "UINT8", "BOOL", "BYTES"])
def test_typed_contents_round_trip(datatype: str) -> None:
    tensor = inference_pb2.ModelInferRequest.InferInputTensor()
    array = ARRAYS[datatype]
    assert tensor_to_contents(array, tensor.contents) == datatype
    np.testing.assert_array_equal(tensor_from_contents("x", datatype, array.shape, tensor.contents), array)


def test_typed_contents_count_mismatch() -> None:
    tensor = inference_pb2.ModelInferRequest.InferInputTensor()
    tensor.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(
        ValueError, match=r"input 'x': contents\.fp32_contents holds 2 values; shape \[3\] needs 3"
    ):
        tensor_from_contents("x", "FP32", (3,), tensor.contents)


def _writer() -> ReplyWriter:
    return ReplyWriter(
        "m", "3", doubles=("compute_ms", "queue_ms"), counts=("queue_depth",), fixed={"energy_source": "rapl"}
    )


@pytest.mark.parametrize("datatype", sorted(ARRAYS))
def test_reply_writer_parses_as_encode_response_writes(datatype: str) -> None:
    """The second reply of a signature takes the cached path; both parse to the same message as
    encode_response's, with the numbers of that reply."""
    writer = _writer()
    outputs: dict[str, np.ndarray] = {
        "out": ARRAYS[datatype],
        "total": np.array(2.5, np.float32),
        "idx": np.arange(3),
    }
    for compute, depth in ((1.25, 0), (7.5, 2000)):  # 2000: an int field that is not cached
        data = writer.encode((compute, 0.5), (depth,), outputs)
        expected = encode_response(
            "m",
            outputs,
            parameters={
                "energy_source": "rapl",
                "compute_ms": compute,
                "queue_ms": 0.5,
                "queue_depth": depth,
            },
            model_version="3",
        )
        header, got = decode_response(data)
        assert header == inference_pb2.ModelInferResponse.FromString(
            split_message(expected, RAW_OUTPUT_FIELD)[0]
        )
        assert header.parameters["compute_ms"].double_param == compute
        assert header.parameters["queue_depth"].int64_param == depth
        for name, array in outputs.items():
            np.testing.assert_array_equal(got[name], array)
            assert got[name].dtype == array.dtype and got[name].shape == array.shape
        full = inference_pb2.ModelInferResponse.FromString(data)  # protobuf itself agrees
        assert [o.name for o in full.outputs] == list(outputs)
        assert len(full.raw_output_contents) == len(outputs)


def test_reply_writer_copies_arrays_that_are_not_contiguous() -> None:
    writer = _writer()
    array = np.arange(12, dtype=np.float32).reshape(3, 4)
    writer.encode((1.0, 1.0), (1,), {"out": array})  # caches the signature
    data = writer.encode((1.0, 1.0), (1,), {"out": array.T.copy().T[:, :3]})
    np.testing.assert_array_equal(decode_response(data)[1]["out"], array[:, :3])
    strided = np.arange(24, dtype=np.float32).reshape(3, 8)[:, ::2]  # same dtype and shape as array
    data = writer.encode((1.0, 1.0), (1,), {"out": strided})
    np.testing.assert_array_equal(decode_response(data)[1]["out"], strided)


def test_raw_spans_finds_every_tensor_payload() -> None:
    data = encode_request(
        "m", {"a": np.arange(3, dtype=np.int32), "b": np.ones(200, np.uint8)}, request_id="r"
    )
    spans = raw_spans(data, RAW_INPUT_FIELD)
    assert [data[s:e] for s, e in spans] == [bytes(r) for r in split_message(data, RAW_INPUT_FIELD)[1]]
    assert [e - s for s, e in spans] == [12, 200]
