"""numpy <-> KServe v2 ``ModelInferRequest`` / ``ModelInferResponse``, without copying tensors.

Tensor bytes never go through protobuf message objects: on decode, the raw tensor fields
(``raw_input_contents`` = 7, ``raw_output_contents`` = 6) are cut out of the wire bytes as
``memoryview`` slices and read with ``np.frombuffer``; only the small header (names, shapes,
parameters) is parsed by protobuf. On encode the header is serialised by protobuf and the
tensor buffers are appended as length-delimited fields. The wire format is exactly KServe's,
so tritonclient and any KServe v2 server interoperate.

>>> data = encode_request("toy", {"x": np.arange(3, dtype=np.float32)})
>>> header, raws = split_message(data, RAW_INPUT_FIELD)
>>> decode_tensor("x", "FP32", (3,), raws[0])
array([0., 1., 2.], dtype=float32)

Arrays decoded here are read-only views of the message bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from moesaic.proto import inference_pb2
from moesaic.runtime.engine import DATATYPES, datatype_of

__all__ = [
    "RAW_INPUT_FIELD",
    "RAW_OUTPUT_FIELD",
    "decode_request",
    "decode_response",
    "decode_tensor",
    "deserialize_bytes_tensor",
    "encode_request",
    "encode_response",
    "from_parameters",
    "serialize_bytes_tensor",
    "set_parameters",
    "split_message",
    "tensor_from_contents",
    "tensor_to_contents",
]

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents

Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------- wire helpers


def _varint(data: Buffer, pos: int) -> tuple[int, int]:
    b = data[pos]
    if b < 0x80:
        return b, pos + 1
    result = b & 0x7F
    shift = 7
    pos += 1
    while True:
        b = data[pos]
        result |= (b & 0x7F) << shift
        pos += 1
        if b < 0x80:
            return result, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed message: varint too long")


def _varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def split_message(data: Buffer, raw_field: int) -> tuple[bytes, list[memoryview]]:
    """Split serialised message bytes into (header bytes, raw tensor slices of ``raw_field``).

    The slices are views of ``data``, in order; the header holds every other field.
    """
    view = memoryview(data)
    n = len(view)
    pos = 0
    run_start = 0
    runs: list[memoryview] = []
    raws: list[memoryview] = []
    try:
        while pos < n:
            start = pos
            tag, pos = _varint(view, pos)
            wire = tag & 7
            if wire == 2:
                length, pos = _varint(view, pos)
                end = pos + length
                if end > n:
                    raise ValueError("malformed message: field runs past the end")
                if tag >> 3 == raw_field:
                    if run_start < start:
                        runs.append(view[run_start:start])
                    raws.append(view[pos:end])
                    run_start = end
                pos = end
            elif wire == 0:
                _, pos = _varint(view, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise ValueError(f"malformed message: wire type {wire}")
    except IndexError:
        raise ValueError("malformed message: truncated") from None
    if pos != n:
        raise ValueError("malformed message: truncated")
    if not raws:
        return bytes(view), raws
    if run_start < n:
        runs.append(view[run_start:n])
    header = runs[0].tobytes() if len(runs) == 1 else b"".join(runs)
    return header, raws


def _raw_fields(raw_field: int, buffers: Iterable[Buffer]) -> list[Buffer]:
    tag = _varint_bytes((raw_field << 3) | 2)
    parts: list[Buffer] = []
    for buf in buffers:
        parts.append(tag + _varint_bytes(len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes))
        parts.append(buf)
    return parts


# ---------------------------------------------------------------- tensors


def serialize_bytes_tensor(array: np.ndarray) -> bytes:
    """KServe BYTES encoding: each element as a 4-byte little-endian length then its bytes."""
    parts = []
    for item in array.reshape(-1):
        raw = item.encode() if isinstance(item, str) else bytes(item)
        parts.append(struct.pack("<I", len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes_tensor(buf: Buffer, shape: Sequence[int], name: str = "tensor") -> np.ndarray:
    """Object array of ``bytes`` from KServe's length-prefixed BYTES encoding."""
    count = math.prod(shape)
    view = memoryview(buf)
    items: list[bytes] = []
    pos = 0
    n = len(view)
    while pos < n:
        if pos + 4 > n:
            raise ValueError(f"input {name!r}: BYTES content truncated in a length prefix")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > n:
            raise ValueError(f"input {name!r}: BYTES element {len(items)} runs past the end")
        items.append(view[pos : pos + length].tobytes())
        pos += length
    if len(items) != count:
        raise ValueError(
            f"input {name!r}: BYTES content holds {len(items)} elements; shape {list(shape)} needs {count}"
        )
    out = np.empty(count, dtype=object)
    out[:] = items
    return out.reshape(tuple(shape))


def decode_tensor(name: str, datatype: str, shape: Sequence[int], buf: Buffer) -> np.ndarray:
    """A read-only numpy view of one raw tensor; ``ValueError`` naming it when sizes disagree."""
    if datatype == "BYTES":
        return deserialize_bytes_tensor(buf, shape, name)
    dtype = DATATYPES.get(datatype)
    if dtype is None:
        raise ValueError(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    if any(d < 0 for d in shape):
        raise ValueError(f"input {name!r}: shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    nbytes = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
    if nbytes != expected:
        raise ValueError(
            f"input {name!r}: raw content is {nbytes} bytes; "
            f"shape {list(shape)} of {datatype} needs {expected}"
        )
    return np.frombuffer(buf, dtype=dtype).reshape(shape)


def _tensor_bytes(array: np.ndarray) -> Buffer:
    if array.dtype == object or array.dtype.kind in "SU":
        return serialize_bytes_tensor(array)
    if not array.flags.c_contiguous:
        array = np.ascontiguousarray(array)
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array.reshape(-1).data.cast("B") if array.size else b""


_CONTENTS_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def tensor_from_contents(name: str, datatype: str, shape: Sequence[int], contents: Any) -> np.ndarray:
    """numpy array from a typed ``InferTensorContents`` (the non-raw form; this one copies)."""
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ValueError(
            f"input {name!r}: datatype {datatype} cannot travel in typed contents; use raw contents"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise ValueError(
            f"input {name!r}: contents.{field} holds {len(values)} values; shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        out = np.empty(count, dtype=object)
        out[:] = list(values)
        return out.reshape(tuple(shape))
    return np.asarray(values, dtype=DATATYPES[datatype]).reshape(shape)


def tensor_to_contents(array: np.ndarray, contents: Any) -> str:
    """Fill a typed ``InferTensorContents`` from ``array``; returns the KServe datatype."""
    datatype = datatype_of(array.dtype)
    field = _CONTENTS_FIELD.get(datatype)
    if field is None:
        raise ValueError(f"datatype {datatype} cannot travel in typed contents")
    flat = array.reshape(-1)
    values = (
        [x.encode() if isinstance(x, str) else bytes(x) for x in flat]
        if datatype == "BYTES"
        else flat.tolist()
    )
    getattr(contents, field).extend(values)
    return datatype


# ---------------------------------------------------------------- parameters


def set_parameters(target: Any, values: Mapping[str, Any]) -> None:
    """Write a mapping into a protobuf ``map<string, InferParameter>``."""
    for key, value in values.items():
        param = target[key]
        if isinstance(value, bool):
            param.bool_param = value
        elif isinstance(value, int):
            param.int64_param = value
        elif isinstance(value, float):
            param.double_param = value
        else:
            param.string_param = str(value)


def from_parameters(params: Any) -> dict[str, Any]:
    """Plain dict from a protobuf ``map<string, InferParameter>``."""
    out: dict[str, Any] = {}
    for key, param in params.items():
        kind = param.WhichOneof("parameter_choice")
        out[key] = getattr(param, kind) if kind else None
    return out


# ---------------------------------------------------------------- messages


def encode_request(
    model: str,
    inputs: Mapping[str, np.ndarray],
    *,
    parameters: Mapping[str, Any] | None = None,
    outputs: Sequence[str] = (),
    request_id: str = "",
    model_version: str = "",
) -> bytes:
    """Serialised ``ModelInferRequest`` with every input in ``raw_input_contents``."""
    req = inference_pb2.ModelInferRequest(model_name=model, model_version=model_version, id=request_id)
    if parameters:
        set_parameters(req.parameters, parameters)
    buffers = []
    for name, array in inputs.items():
        array = np.asarray(array)
        req.inputs.add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        buffers.append(_tensor_bytes(array))
    for name in outputs:
        req.outputs.add(name=name)
    return b"".join([req.SerializeToString(), *_raw_fields(RAW_INPUT_FIELD, buffers)])


def decode_request(data: Buffer) -> tuple[Any, list[memoryview]]:
    """(``ModelInferRequest`` header without tensors, raw input slices)."""
    header, raws = split_message(data, RAW_INPUT_FIELD)
    return inference_pb2.ModelInferRequest.FromString(header), raws


def encode_response(
    model: str,
    outputs: Mapping[str, np.ndarray],
    *,
    parameters: Mapping[str, Any] | None = None,
    request_id: str = "",
    model_version: str = "",
) -> bytes:
    """Serialised ``ModelInferResponse`` with every output in ``raw_output_contents``."""
    resp = inference_pb2.ModelInferResponse(model_name=model, model_version=model_version, id=request_id)
    if parameters:
        set_parameters(resp.parameters, parameters)
    buffers = []
    add = resp.outputs.add
    for name, array in outputs.items():
        add(name=name, datatype=datatype_of(array.dtype), shape=array.shape)
        buffers.append(_tensor_bytes(array))
    return b"".join([resp.SerializeToString(), *_raw_fields(RAW_OUTPUT_FIELD, buffers)])


def decode_response(data: Buffer) -> tuple[Any, dict[str, np.ndarray]]:
    """(``ModelInferResponse`` header, outputs by name as read-only arrays)."""
    header_bytes, raws = split_message(data, RAW_OUTPUT_FIELD)
    header = inference_pb2.ModelInferResponse.FromString(header_bytes)
    outputs: dict[str, np.ndarray] = {}
    if raws and len(raws) != len(header.outputs):
        raise ValueError(f"response holds {len(raws)} raw outputs for {len(header.outputs)} output tensors")
    for i, tensor in enumerate(header.outputs):
        shape = tuple(tensor.shape)
        if raws:
            outputs[tensor.name] = decode_tensor(tensor.name, tensor.datatype, shape, raws[i])
        else:
            outputs[tensor.name] = tensor_from_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return header, outputs
