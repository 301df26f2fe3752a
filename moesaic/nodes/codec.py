"""numpy <-> KServe v2 ``ModelInferRequest`` / ``ModelInferResponse``, without copying tensors.

Tensor bytes never go through protobuf message objects: on decode, the raw tensor fields
(``raw_input_contents`` = 7, ``raw_output_contents`` = 6) are cut out of the wire bytes as
``memoryview`` slices and read with ``np.frombuffer``; only the small header (names, shapes,
parameters) is parsed by protobuf. On encode the header is serialised by protobuf and the
tensor buffers are appended as length-delimited fields. The wire format is exactly KServe's,
so tritonclient and any KServe v2 server interoperate; the field-level reading and writing is
:mod:`moesaic.nodes.wire`.

>>> data = encode_request("toy", {"x": np.arange(3, dtype=np.float32)})
>>> header, raws = split_message(data, RAW_INPUT_FIELD)
>>> decode_tensor("x", "FP32", (3,), raws[0])
array([0., 1., 2.], dtype=float32)

Arrays decoded here are read-only views of the message bytes.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from moesaic.errors import InvalidInput
from moesaic.nodes.wire import (
    DOUBLE,
    DOUBLE_PREFIXES,
    PARAMETER_FIELDS,
    RAW_INPUT_FIELD,
    RAW_OUTPUT_FIELD,
    RAW_TAGS,
    Buffer,
    cached_string_field,
    double_prefix,
    encode_varint,
    output_field,
    parameter_field,
    raw_fields,
    remember,
    split_message,
    string_field,
)
from moesaic.proto import inference_pb2
from moesaic.runtime.engine import DATATYPES, datatype_of

__all__ = [
    "ReplyWriter",
    "decode_request",
    "decode_response",
    "decode_tensor",
    "deserialize_bytes_tensor",
    "encode_request",
    "encode_response",
    "from_parameters",
    "serialize_bytes_tensor",
    "set_parameters",
    "tensor_from_contents",
    "tensor_to_contents",
]

# Encoded output headers that repeat from reply to reply, each cache bounded (by
# :func:`~moesaic.nodes.wire.remember`) so that unusual traffic cannot grow it without end.
_OUTPUT_FIELDS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_REPLY_OUTPUTS: dict[tuple[str, np.dtype[Any], tuple[int, ...]], bytes] = {}  # + raw tag, length
_DATATYPE_OF: dict[np.dtype[Any], str] = {np.dtype(t): name for name, t in DATATYPES.items()}


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
            raise InvalidInput(f"input {name!r}: BYTES content truncated in a length prefix")
        (length,) = struct.unpack_from("<I", view, pos)
        pos += 4
        if pos + length > n:
            raise InvalidInput(f"input {name!r}: BYTES element {len(items)} runs past the end")
        items.append(view[pos : pos + length].tobytes())
        pos += length
    if len(items) != count:
        raise InvalidInput(
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
        raise InvalidInput(
            f"input {name!r}: unknown datatype {datatype!r}; expected one of {sorted(DATATYPES)}"
        )
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input {name!r}: shape {list(shape)} has a negative dimension")
    expected = math.prod(shape) * dtype.itemsize
    nbytes = len(buf) if isinstance(buf, bytes) else memoryview(buf).nbytes
    if nbytes != expected:
        raise InvalidInput(
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
        raise InvalidInput(
            f"input {name!r}: datatype {datatype} cannot travel in typed contents; use raw contents"
        )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
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
        raise InvalidInput(f"datatype {datatype} cannot travel in typed contents")
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
    return b"".join([req.SerializeToString(), *raw_fields(RAW_INPUT_FIELD, buffers)])


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
    """Serialised ``ModelInferResponse`` with every output in ``raw_output_contents``.

    Written field by field (fields in number order, as protobuf writes them): this is the
    reply of every request, and building protobuf message objects cost more than the engine
    call of a small model. Protobuf parses it to the same message as it would build.
    """
    parts: list[Buffer] = []
    if model:
        parts.append(cached_string_field(b"\x0a", model))
    if model_version:
        parts.append(cached_string_field(b"\x12", model_version))
    if request_id:
        parts.append(string_field(b"\x1a", request_id))
    if parameters:
        doubles = DOUBLE_PREFIXES
        for key, value in parameters.items():
            prefix = doubles.get(key) if type(value) is float else None
            if prefix is not None:  # inline the common case: a cached prefix and 8 value bytes
                parts += (prefix, DOUBLE(value))
            else:
                parts.append(parameter_field(b"\x22", key, value))
    buffers = []
    for name, array in outputs.items():
        datatype = _DATATYPE_OF.get(array.dtype) or datatype_of(array.dtype)
        shape = array.shape
        field = _OUTPUT_FIELDS.get((name, datatype, shape))
        if field is None:
            field = remember(_OUTPUT_FIELDS, (name, datatype, shape), output_field(name, datatype, shape))
        parts.append(field)
        buffers.append(_tensor_bytes(array))
    parts += raw_fields(RAW_OUTPUT_FIELD, buffers)
    return b"".join(parts)


class ReplyWriter:
    """Writes the replies of one model version whose parameters are the same keys every time:
    ``doubles`` (numbers that change from reply to reply), ``counts`` (small integers) and
    ``fixed`` (values written once). One ``struct`` pack writes the head (names and every
    double with its key) and each output's header is cached by name, datatype and shape, so
    a reply is a pack, a lookup per output and one join. Protobuf parses it to the same
    message as :func:`encode_response` writes.

    >>> writer = ReplyWriter("toy", "1", doubles=("compute_ms",), fixed={"energy_source": "estimate"})
    >>> data = writer.encode((1.5,), (), {"y": np.zeros(2, np.float32)})
    >>> decode_response(data)[0].parameters["compute_ms"].double_param
    1.5
    """

    __slots__ = ("_args", "_counts", "_model", "_model_version", "_pack")

    def __init__(
        self,
        model: str,
        model_version: str,
        *,
        doubles: Sequence[str],
        counts: Sequence[str] = (),
        fixed: Mapping[str, Any] | None = None,
    ) -> None:
        head = string_field(b"\x0a", model) if model else b""
        head += string_field(b"\x12", model_version) if model_version else b""
        head += b"".join(parameter_field(b"\x22", k, v) for k, v in (fixed or {}).items())
        consts = [double_prefix(key) for key in doubles]
        if consts:
            consts[0] = head + consts[0]
            self._pack = struct.Struct("<" + "".join(f"{len(c)}sd" for c in consts)).pack
        else:
            self._pack = struct.Struct(f"<{len(head)}s").pack
            consts = [head]
        self._args: list[Any] = [x for c in consts for x in (c, 0.0)][: max(len(doubles) * 2, 1)]
        self._counts = tuple(counts)
        self._model, self._model_version = model, model_version

    def encode(
        self,
        doubles: Sequence[float],
        counts: Sequence[int],
        outputs: Mapping[str, np.ndarray],
    ) -> bytes:
        """One reply: ``doubles`` and ``counts`` in the order the writer was given their keys."""
        args = self._args.copy()
        args[1::2] = doubles
        parts: list[Any] = [self._pack(*args)]
        for key, value in zip(self._counts, counts, strict=True):
            field = PARAMETER_FIELDS.get((key, int, value))
            parts.append(field if field is not None else parameter_field(b"\x22", key, value))
        for name, array in outputs.items():
            # each output's header, then its raw field (tag, length, the array's own bytes)
            field = _REPLY_OUTPUTS.get((name, array.dtype, array.shape))
            if field is None or not array.flags.c_contiguous:
                return self._slow(parts, outputs)
            parts += (field, array)
        return b"".join(parts)

    def _slow(self, parts: list[Any], outputs: Mapping[str, np.ndarray]) -> bytes:
        """Outputs not seen before (their headers are cached from now on) or not contiguous."""
        del parts[1 + len(self._counts) :]
        buffers = []
        for name, array in outputs.items():
            datatype = _DATATYPE_OF.get(array.dtype) or datatype_of(array.dtype)
            header = output_field(name, datatype, array.shape)
            parts.append(header)
            buffers.append(_tensor_bytes(array))
            if datatype != "BYTES" and array.dtype in _DATATYPE_OF and array.dtype.byteorder != ">":
                # the output's header, then its raw field's tag and length: the same for
                # every array of this name, dtype and shape
                raw_head = RAW_TAGS[RAW_OUTPUT_FIELD] + encode_varint(array.nbytes)
                remember(_REPLY_OUTPUTS, (name, array.dtype, array.shape), header + raw_head)
        parts += raw_fields(RAW_OUTPUT_FIELD, buffers)
        return b"".join(parts)


def decode_response(data: Buffer) -> tuple[Any, dict[str, np.ndarray]]:
    """(``ModelInferResponse`` header, outputs by name as read-only arrays)."""
    header_bytes, raws = split_message(data, RAW_OUTPUT_FIELD)
    header = inference_pb2.ModelInferResponse.FromString(header_bytes)
    outputs: dict[str, np.ndarray] = {}
    if raws and len(raws) != len(header.outputs):
        raise InvalidInput(f"response holds {len(raws)} raw outputs for {len(header.outputs)} output tensors")
    for i, tensor in enumerate(header.outputs):
        shape = tuple(tensor.shape)
        if raws:
            outputs[tensor.name] = decode_tensor(tensor.name, tensor.datatype, shape, raws[i])
        else:
            outputs[tensor.name] = tensor_from_contents(tensor.name, tensor.datatype, shape, tensor.contents)
    return header, outputs
