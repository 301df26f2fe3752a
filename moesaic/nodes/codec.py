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

from moesaic.errors import InvalidInput
from moesaic.proto import inference_pb2
from moesaic.runtime.engine import DATATYPES, datatype_of

__all__ = [
    "RAW_INPUT_FIELD",
    "RAW_OUTPUT_FIELD",
    "ReplyWriter",
    "decode_request",
    "decode_response",
    "decode_tensor",
    "deserialize_bytes_tensor",
    "encode_request",
    "encode_response",
    "encode_varint",
    "from_parameters",
    "raw_spans",
    "serialize_bytes_tensor",
    "set_parameters",
    "split_message",
    "tensor_from_contents",
    "tensor_to_contents",
]

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
_RAW_TAGS = {RAW_INPUT_FIELD: b"\x3a", RAW_OUTPUT_FIELD: b"\x32"}  # field number << 3 | 2

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
            raise InvalidInput("malformed message: varint too long")


_ONE_BYTE = [bytes((i,)) for i in range(0x80)]


def encode_varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf varint."""
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
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    buf: Buffer = data if type(data) is bytes else view  # indexing bytes is the fastest
    n = len(view)
    pos = 0
    run_start = 0
    runs: list[memoryview] = []
    raws: list[memoryview] = []
    try:
        while pos < n:
            start = pos
            tag = buf[pos]  # one-byte tags and lengths inline; longer varints through _varint
            if tag < 0x80:
                pos += 1
            else:
                tag, pos = _varint(buf, pos)
            wire = tag & 7
            if wire == 2:
                length = buf[pos]
                if length < 0x80:
                    pos += 1
                else:
                    length, pos = _varint(buf, pos)
                end = pos + length
                if end > n:
                    raise InvalidInput("malformed message: field runs past the end")
                if tag >> 3 == raw_field:
                    if run_start < start:
                        runs.append(view[run_start:start])
                    raws.append(view[pos:end])
                    run_start = end
                pos = end
            elif wire == 0:
                _, pos = _varint(buf, pos)
            elif wire == 1:
                pos += 8
            elif wire == 5:
                pos += 4
            else:
                raise InvalidInput(f"malformed message: wire type {wire}")
    except IndexError:
        raise InvalidInput("malformed message: truncated") from None
    if pos != n:
        raise InvalidInput("malformed message: truncated")
    if not raws:
        return bytes(view), raws
    if run_start < n:
        runs.append(view[run_start:n])
    header = runs[0].tobytes() if len(runs) == 1 else b"".join(runs)
    return header, raws


def raw_spans(data: Buffer, raw_field: int) -> list[tuple[int, int]]:
    """(start, end) byte offsets of the payloads of ``raw_field`` in well-formed message bytes."""
    view = memoryview(data).cast("B") if not isinstance(data, bytes) else data
    n, pos, spans = len(view), 0, []
    while pos < n:
        tag, pos = _varint(view, pos)
        wire = tag & 7
        if wire == 2:
            length, pos = _varint(view, pos)
            if tag >> 3 == raw_field:
                spans.append((pos, pos + length))
            pos += length
        elif wire == 0:
            _, pos = _varint(view, pos)
        else:
            pos += 8 if wire == 1 else 4
    return spans


def _raw_fields(raw_field: int, buffers: Iterable[Buffer]) -> list[Buffer]:
    tag = _RAW_TAGS.get(raw_field) or encode_varint((raw_field << 3) | 2)
    parts: list[Buffer] = []
    for buf in buffers:
        n = len(buf) if type(buf) is bytes else memoryview(buf).nbytes
        parts.append(tag + (_ONE_BYTE[n] if n < 0x80 else encode_varint(n)))
        parts.append(buf)
    return parts


# Encoded fields that repeat from reply to reply (model names, output tensor headers, parameter
# keys), each cache bounded so that unusual traffic cannot grow it without end.
_CACHE_LIMIT = 1024
_INT64_LIMIT = 1 << 63
_STRING_FIELDS: dict[tuple[bytes, str], bytes] = {}
_OUTPUT_FIELDS: dict[tuple[str, str, tuple[int, ...]], bytes] = {}
_REPLY_OUTPUTS: dict[tuple[str, np.dtype[Any], tuple[int, ...]], bytes] = {}  # + raw tag, length
_DOUBLE_PREFIX: dict[str, bytes] = {}  # parameter entry up to its 8 value bytes, by key
_PARAMETER_FIELDS: dict[tuple[str, type, Any], bytes] = {}  # whole bool / str entries
_DATATYPE_OF: dict[np.dtype[Any], str] = {np.dtype(t): name for name, t in DATATYPES.items()}
_DOUBLE = struct.Struct("<d").pack


def _remember(cache: dict[Any, bytes], key: Any, value: bytes) -> bytes:
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, length, ``payload``."""
    n = len(payload)
    return tag + (_ONE_BYTE[n] if n < 0x80 else encode_varint(n)) + payload


def _string_field(tag: bytes, value: str) -> bytes:
    return _delimited(tag, value.encode())


def _cached_string_field(tag: bytes, value: str) -> bytes:
    field = _STRING_FIELDS.get((tag, value))
    return field if field is not None else _remember(_STRING_FIELDS, (tag, value), _string_field(tag, value))


def _int64_bytes(value: int) -> bytes:
    """Varint of a protobuf int64 (negative numbers as their 64-bit two's complement)."""
    if not -_INT64_LIMIT <= value < _INT64_LIMIT:
        raise InvalidInput(f"value {value} is out of range for int64")
    return encode_varint(value + (1 << 64) if value < 0 else value)


def _output_field(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """``outputs`` field of a response: one ``InferOutputTensor`` (name, datatype, shape)."""
    tensor = _string_field(b"\x0a", name) + _string_field(b"\x12", datatype)
    if shape:
        packed = bytes(shape) if max(shape) < 0x80 else b"".join(map(encode_varint, shape))
        tensor += _delimited(b"\x1a", packed)
    return _delimited(b"\x2a", tensor)


def _parameter_field(tag: bytes, key: str, value: Any) -> bytes:
    """One ``map<string, InferParameter>`` entry, typed as :func:`set_parameters` types it."""
    if type(value) is float:  # the common case: a cached prefix and the 8 value bytes
        prefix = _DOUBLE_PREFIX.get(key)
        if prefix is None:
            entry = _string_field(b"\x0a", key) + b"\x12\x09\x21"
            prefix = _remember(_DOUBLE_PREFIX, key, tag + encode_varint(len(entry) + 8) + entry)
        return prefix + _DOUBLE(value)
    if type(value) is int and 0 <= value < 1024:  # small counts (queue depth): whole entry cached
        field = _PARAMETER_FIELDS.get((key, int, value))
        if field is None:
            param = b"\x10" + _int64_bytes(value)
            entry = _delimited(tag, _string_field(b"\x0a", key) + _delimited(b"\x12", param))
            field = _remember(_PARAMETER_FIELDS, (key, int, value), entry)
        return field
    if isinstance(value, bool):
        param = b"\x08\x01" if value else b"\x08\x00"
    elif isinstance(value, int):
        param = b"\x10" + _int64_bytes(value)
    elif isinstance(value, float):
        param = b"\x21" + _DOUBLE(value)
    else:
        text = str(value)
        field = _PARAMETER_FIELDS.get((key, str, text))
        if field is None:
            param = _string_field(b"\x1a", text)
            entry = _delimited(tag, _string_field(b"\x0a", key) + _delimited(b"\x12", param))
            field = _remember(_PARAMETER_FIELDS, (key, str, text), entry) if len(text) <= 64 else entry
        return field
    return _delimited(tag, _string_field(b"\x0a", key) + _delimited(b"\x12", param))


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
    """Serialised ``ModelInferResponse`` with every output in ``raw_output_contents``.

    Written field by field (fields in number order, as protobuf writes them): this is the
    reply of every request, and building protobuf message objects cost more than the engine
    call of a small model. Protobuf parses it to the same message as it would build.
    """
    parts: list[Buffer] = []
    if model:
        parts.append(_cached_string_field(b"\x0a", model))
    if model_version:
        parts.append(_cached_string_field(b"\x12", model_version))
    if request_id:
        parts.append(_string_field(b"\x1a", request_id))
    if parameters:
        doubles = _DOUBLE_PREFIX
        for key, value in parameters.items():
            prefix = doubles.get(key) if type(value) is float else None
            if prefix is not None:  # inline the common case: a cached prefix and 8 value bytes
                parts += (prefix, _DOUBLE(value))
            else:
                parts.append(_parameter_field(b"\x22", key, value))
    buffers = []
    for name, array in outputs.items():
        datatype = _DATATYPE_OF.get(array.dtype) or datatype_of(array.dtype)
        shape = array.shape
        field = _OUTPUT_FIELDS.get((name, datatype, shape))
        if field is None:
            field = _remember(_OUTPUT_FIELDS, (name, datatype, shape), _output_field(name, datatype, shape))
        parts.append(field)
        buffers.append(_tensor_bytes(array))
    parts += _raw_fields(RAW_OUTPUT_FIELD, buffers)
    return b"".join(parts)


def _double_prefix(key: str) -> bytes:
    """A double parameter's map entry up to its 8 value bytes."""
    prefix = _DOUBLE_PREFIX.get(key)
    if prefix is None:
        entry = _string_field(b"\x0a", key) + b"\x12\x09\x21"
        prefix = _remember(_DOUBLE_PREFIX, key, b"\x22" + encode_varint(len(entry) + 8) + entry)
    return prefix


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
        head = _string_field(b"\x0a", model) if model else b""
        head += _string_field(b"\x12", model_version) if model_version else b""
        head += b"".join(_parameter_field(b"\x22", k, v) for k, v in (fixed or {}).items())
        consts = [_double_prefix(key) for key in doubles]
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
            field = _PARAMETER_FIELDS.get((key, int, value))
            parts.append(field if field is not None else _parameter_field(b"\x22", key, value))
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
            header = _output_field(name, datatype, array.shape)
            parts.append(header)
            buffers.append(_tensor_bytes(array))
            if datatype != "BYTES" and array.dtype in _DATATYPE_OF and array.dtype.byteorder != ">":
                # the output's header, then its raw field's tag and length: the same for
                # every array of this name, dtype and shape
                raw_head = _RAW_TAGS[RAW_OUTPUT_FIELD] + encode_varint(array.nbytes)
                _remember(_REPLY_OUTPUTS, (name, array.dtype, array.shape), header + raw_head)
        parts += _raw_fields(RAW_OUTPUT_FIELD, buffers)
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
