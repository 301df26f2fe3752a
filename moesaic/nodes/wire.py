"""Protobuf wire format of KServe v2 messages: varints, field splitting and field writers.

Enough of protobuf's encoding to keep tensor bytes out of message objects: :func:`split_message`
cuts the raw tensor fields (``raw_input_contents`` = 7, ``raw_output_contents`` = 6) out of a
message as ``memoryview`` slices and leaves the rest (the header) for protobuf to parse;
:func:`raw_fields` and the field writers write those fields, and the repeated parts of a reply,
byte for byte as protobuf writes them. Encoded fields that repeat are cached, each cache bounded.
:mod:`moesaic.nodes.codec` builds tensors and whole messages on top.

>>> fields = b"".join(raw_fields(RAW_INPUT_FIELD, [b"abc", b"de"]))
>>> header, raws = split_message(fields, RAW_INPUT_FIELD)
>>> header, [bytes(raw) for raw in raws]
(b'', [b'abc', b'de'])
>>> list(encode_varint(300))
[172, 2]
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from moesaic.errors import InvalidInput

__all__ = [
    "DOUBLE",
    "DOUBLE_PREFIXES",
    "PARAMETER_FIELDS",
    "RAW_INPUT_FIELD",
    "RAW_OUTPUT_FIELD",
    "RAW_TAGS",
    "Buffer",
    "cached_string_field",
    "double_prefix",
    "encode_varint",
    "output_field",
    "parameter_field",
    "raw_fields",
    "raw_spans",
    "remember",
    "split_message",
    "string_field",
]

RAW_INPUT_FIELD = 7  # ModelInferRequest.raw_input_contents
RAW_OUTPUT_FIELD = 6  # ModelInferResponse.raw_output_contents
RAW_TAGS = {RAW_INPUT_FIELD: b"\x3a", RAW_OUTPUT_FIELD: b"\x32"}  # field number << 3 | 2

Buffer = bytes | bytearray | memoryview


# ---------------------------------------------------------------- reading


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


# ---------------------------------------------------------------- writing


def raw_fields(raw_field: int, buffers: Iterable[Buffer]) -> list[Buffer]:
    """Tag and length of each buffer as a ``raw_field`` entry, each followed by the buffer itself."""
    tag = RAW_TAGS.get(raw_field) or encode_varint((raw_field << 3) | 2)
    parts: list[Buffer] = []
    for buf in buffers:
        n = len(buf) if type(buf) is bytes else memoryview(buf).nbytes
        parts.append(tag + (_ONE_BYTE[n] if n < 0x80 else encode_varint(n)))
        parts.append(buf)
    return parts


# Encoded fields that repeat from message to message (model names, parameter keys), each cache
# bounded so that unusual traffic cannot grow it without end.
_CACHE_LIMIT = 1024
_INT64_LIMIT = 1 << 63
_STRING_FIELDS: dict[tuple[bytes, str], bytes] = {}
DOUBLE_PREFIXES: dict[str, bytes] = {}  # parameter entry up to its 8 value bytes, by key
PARAMETER_FIELDS: dict[tuple[str, type, Any], bytes] = {}  # whole bool / str entries
DOUBLE = struct.Struct("<d").pack


def remember(cache: dict[Any, bytes], key: Any, value: bytes) -> bytes:
    """Store ``value`` under ``key`` (emptying a full ``cache`` first) and return it."""
    if len(cache) >= _CACHE_LIMIT:
        cache.clear()
    cache[key] = value
    return value


def _delimited(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: ``tag``, length, ``payload``."""
    n = len(payload)
    return tag + (_ONE_BYTE[n] if n < 0x80 else encode_varint(n)) + payload


def string_field(tag: bytes, value: str) -> bytes:
    """A ``string`` field: ``tag``, length, ``value`` in UTF-8."""
    return _delimited(tag, value.encode())


def cached_string_field(tag: bytes, value: str) -> bytes:
    """:func:`string_field` for values that repeat (model names and versions), cached."""
    field = _STRING_FIELDS.get((tag, value))
    return field if field is not None else remember(_STRING_FIELDS, (tag, value), string_field(tag, value))


def _int64_bytes(value: int) -> bytes:
    """Varint of a protobuf int64 (negative numbers as their 64-bit two's complement)."""
    if not -_INT64_LIMIT <= value < _INT64_LIMIT:
        raise InvalidInput(f"value {value} is out of range for int64")
    return encode_varint(value + (1 << 64) if value < 0 else value)


def output_field(name: str, datatype: str, shape: tuple[int, ...]) -> bytes:
    """``outputs`` field of a response: one ``InferOutputTensor`` (name, datatype, shape)."""
    tensor = string_field(b"\x0a", name) + string_field(b"\x12", datatype)
    if shape:
        packed = bytes(shape) if max(shape) < 0x80 else b"".join(map(encode_varint, shape))
        tensor += _delimited(b"\x1a", packed)
    return _delimited(b"\x2a", tensor)


def parameter_field(tag: bytes, key: str, value: Any) -> bytes:
    """One ``map<string, InferParameter>`` entry, typed as
    :func:`~moesaic.nodes.codec.set_parameters` types it."""
    if type(value) is float:  # the common case: a cached prefix and the 8 value bytes
        prefix = DOUBLE_PREFIXES.get(key)
        if prefix is None:
            entry = string_field(b"\x0a", key) + b"\x12\x09\x21"
            prefix = remember(DOUBLE_PREFIXES, key, tag + encode_varint(len(entry) + 8) + entry)
        return prefix + DOUBLE(value)
    if type(value) is int and 0 <= value < 1024:  # small counts (queue depth): whole entry cached
        field = PARAMETER_FIELDS.get((key, int, value))
        if field is None:
            param = b"\x10" + _int64_bytes(value)
            entry = _delimited(tag, string_field(b"\x0a", key) + _delimited(b"\x12", param))
            field = remember(PARAMETER_FIELDS, (key, int, value), entry)
        return field
    if isinstance(value, bool):
        param = b"\x08\x01" if value else b"\x08\x00"
    elif isinstance(value, int):
        param = b"\x10" + _int64_bytes(value)
    elif isinstance(value, float):
        param = b"\x21" + DOUBLE(value)
    else:
        text = str(value)
        field = PARAMETER_FIELDS.get((key, str, text))
        if field is None:
            param = string_field(b"\x1a", text)
            entry = _delimited(tag, string_field(b"\x0a", key) + _delimited(b"\x12", param))
            field = remember(PARAMETER_FIELDS, (key, str, text), entry) if len(text) <= 64 else entry
        return field
    return _delimited(tag, string_field(b"\x0a", key) + _delimited(b"\x12", param))


def double_prefix(key: str) -> bytes:
    """A double parameter's map entry up to its 8 value bytes."""
    prefix = DOUBLE_PREFIXES.get(key)
    if prefix is None:
        entry = string_field(b"\x0a", key) + b"\x12\x09\x21"
        prefix = remember(DOUBLE_PREFIXES, key, b"\x22" + encode_varint(len(entry) + 8) + entry)
    return prefix
