"""What an ONNX graph file declares, read without the onnx package (the runtime-only
install has none): node and initializer counts, inputs and outputs with types and shapes.

Field numbers from onnx.proto:
  ModelProto      graph 7
  GraphProto      node 1, initializer 5, input 11, output 12
  ValueInfoProto  name 1, type 2
  TypeProto       tensor_type 1, optional_type 9 (elem_type 1: a TypeProto)
  Tensor          elem_type 1, shape 2 (TensorShapeProto: dim 1; dim_value 1, dim_param 2)
"""

from __future__ import annotations

import mmap
from dataclasses import dataclass
from pathlib import Path

from edgellama.runtime.errors import BadModelFileError
from edgellama.runtime.external_data import fields

# TensorProto.DataType values -> names as numpy / onnx print them
ELEM_TYPES = {1: "float", 2: "uint8", 3: "int8", 5: "int16", 6: "int32", 7: "int64", 9: "bool", 10: "float16",
              11: "double", 12: "uint32", 13: "uint64", 16: "bfloat16"}


@dataclass(frozen=True)
class Value:
    name: str
    type: str  # "float", "int64", "optional int64" ...
    shape: list[int | str]


@dataclass(frozen=True)
class GraphInfo:
    nodes: int
    initializers: int
    inputs: list[Value]
    outputs: list[Value]


def read_graph_info(path: Path) -> GraphInfo:
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                return _graph(buf, _only(buf, 0, len(buf), 7))
            finally:
                buf.release()
    except (ValueError, IndexError, OSError) as exc:
        raise BadModelFileError(f"{path}: cannot read the graph ({exc}); re-export the model") from None


def _only(buf, pos: int, end: int, field: int) -> tuple[int, int]:
    for f, start, stop in fields(buf, pos, end):
        if f == field and start >= 0:
            return start, stop
    raise ValueError(f"no field {field}")


def _graph(buf, span: tuple[int, int]) -> GraphInfo:
    counts = {1: 0, 5: 0}
    values: dict[int, list[Value]] = {11: [], 12: []}
    for f, start, stop in fields(buf, *span):
        if f in counts:
            counts[f] += 1
        elif f in values and start >= 0:
            values[f].append(_value(buf, start, stop))
    return GraphInfo(counts[1], counts[5], values[11], values[12])


def _value(buf, pos: int, end: int) -> Value:
    name, kind, shape = "", "?", []
    for f, start, stop in fields(buf, pos, end):
        if f == 1 and start >= 0:
            name = bytes(buf[start:stop]).decode("utf-8", "replace")
        elif f == 2 and start >= 0:
            kind, shape = _type(buf, start, stop)
    return Value(name, kind, shape)


def _type(buf, pos: int, end: int, depth: int = 0) -> tuple[str, list]:
    for f, start, stop in fields(buf, pos, end):
        if f == 1 and start >= 0:
            return _tensor(buf, start, stop)
        if f == 9 and start >= 0 and depth < 4:
            inner = _only(buf, start, stop, 1)
            kind, shape = _type(buf, *inner, depth=depth + 1)
            return f"optional {kind}", shape
    return "?", []


def _tensor(buf, pos: int, end: int) -> tuple[str, list]:
    kind, shape = "?", []
    for f, start, value in fields(buf, pos, end):
        if f == 1 and start < 0:
            kind = ELEM_TYPES.get(value, f"type{value}")
        elif f == 2 and start >= 0:
            shape = [_dim(buf, s, e) for g, s, e in fields(buf, start, value) if g == 1 and s >= 0]
    return kind, shape


def _dim(buf, pos: int, end: int) -> int | str:
    for f, start, value in fields(buf, pos, end):
        if f == 1 and start < 0:
            return value
        if f == 2 and start >= 0:
            return bytes(buf[start:value]).decode("utf-8", "replace")
    return "?"
