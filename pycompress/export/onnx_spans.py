"""Where each initializer's bytes sit inside a serialized ONNX file.

The packed container must restore the *same bytes*, so it never re-serializes
the model (protobuf writers differ in field order and encoding): it cuts the
``raw_data`` payloads of chosen tensors out of the file and puts them back at
the same offsets. This module walks the protobuf wire format just far enough
to find those offsets: ``ModelProto.graph`` (field 7) ->
``GraphProto.initializer`` (field 5) -> ``TensorProto`` fields ``data_type``
(2), ``name`` (8), ``raw_data`` (9), ``data_location`` (14).

Every read is bounds-checked; malformed input raises ``ValueError``.
"""

from __future__ import annotations

from dataclasses import dataclass

# onnx.TensorProto.DataType values this module reports by name.
DATA_TYPES = {1: "float", 2: "uint8", 3: "int8", 10: "float16", 11: "double"}

_MODEL_GRAPH, _GRAPH_INITIALIZER = 7, 5
_TENSOR_DATA_TYPE, _TENSOR_NAME, _TENSOR_RAW_DATA, _TENSOR_DATA_LOCATION = 2, 8, 9, 14


@dataclass(frozen=True)
class TensorSpan:
    name: str
    data_type: int       # onnx.TensorProto.DataType
    offset: int          # first byte of raw_data's payload in the file
    length: int          # payload bytes


def _varint(data: bytes, pos: int, end: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end:
            raise ValueError("truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def _fields(data: bytes, start: int, end: int):
    """Yield (field number, wire type, value or (payload start, payload end)) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(data, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos, end)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(data, pos, end)
            if pos + length > end:
                raise ValueError("length-delimited field runs past its message")
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 1 or wire == 5:
            size = 8 if wire == 1 else 4
            if pos + size > end:
                raise ValueError("fixed-size field runs past its message")
            pos += size
        else:  # groups (3, 4) are not used by ONNX; anything else is garbage
            raise ValueError(f"unsupported protobuf wire type {wire}")


def _tensor(data: bytes, start: int, end: int) -> TensorSpan | None:
    name, data_type, raw, raw_count, location = "", 0, None, 0, 0
    for number, wire, value in _fields(data, start, end):
        if number == _TENSOR_DATA_TYPE and wire == 0:
            data_type = value
        elif number == _TENSOR_NAME and wire == 2:
            name = data[value[0]:value[1]].decode("utf-8", errors="replace")
        elif number == _TENSOR_RAW_DATA and wire == 2:
            raw, raw_count = value, raw_count + 1
        elif number == _TENSOR_DATA_LOCATION and wire == 0:
            location = value
    # A repeated raw_data field (protobuf keeps the last) or external data:
    # not a plain in-file payload, leave it alone.
    if raw is None or raw_count != 1 or location != 0:
        return None
    return TensorSpan(name, data_type, raw[0], raw[1] - raw[0])


def initializer_spans(data: bytes) -> list[TensorSpan]:
    """Raw-data spans of the top-level graph's initializers, in file order."""
    spans = []
    for number, wire, value in _fields(data, 0, len(data)):
        if number != _MODEL_GRAPH or wire != 2:
            continue
        for g_number, g_wire, g_value in _fields(data, *value):
            if g_number == _GRAPH_INITIALIZER and g_wire == 2:
                span = _tensor(data, *g_value)
                if span is not None:
                    spans.append(span)
    return spans
