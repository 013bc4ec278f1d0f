"""Which files an ONNX graph reads besides itself, found without the onnx package.

A model folder is untrusted input: any tensor's external data may name any path
("../../home/me/.ssh/id_rsa", "/etc/shadow"). Recent ONNX Runtime versions refuse such
paths; older ones read them. This module checks every external-data location before a
session is made, whatever ONNX Runtime version is installed.

The walk reads the protobuf wire format directly and descends only into the messages that
can hold tensors (field numbers from onnx.proto):

  ModelProto      graph 7, functions 25
  FunctionProto   node 7
  GraphProto      node 1, initializer 5, sparse_initializer 15
  NodeProto       attribute 5
  AttributeProto  t 5, g 6, tensors 10, graphs 11, sparse_tensor 22, sparse_tensors 23
  SparseTensorProto values 1, indices 2
  TensorProto     external_data 13 (StringStringEntryProto: key 1, value 2)

Everything else (weights in raw_data, names, shapes) is skipped by its length, so the walk
costs a few milliseconds even on a graph with its weights inside.
"""

from __future__ import annotations

import mmap
from pathlib import Path
from typing import Callable, Iterator

from .errors import BadModelFileError

_CHILDREN = {  # message -> {field number: child message}
    "model": {7: "graph", 25: "function"},
    "function": {7: "node"},
    "graph": {1: "node", 5: "tensor", 15: "sparse"},
    "node": {5: "attribute"},
    "attribute": {5: "tensor", 6: "graph", 10: "tensor", 11: "graph", 22: "sparse", 23: "sparse"},
    "sparse": {1: "tensor", 2: "tensor"},
    "tensor": {},  # external_data 13: read by _entry
}
_MAX_DEPTH = 64  # subgraphs nest (If / Loop bodies); a deeper file is hostile


class _Malformed(Exception):
    pass


def external_data(graph: Path) -> list[dict[str, str]]:
    """The external_data entries ({"location": ..., "offset": ..., "length": ...}) of every
    tensor in the graph file that keeps its values outside it."""
    if not Path(graph).is_file():
        raise BadModelFileError(f"{graph}: the graph file is missing; re-export the model")
    with open(graph, "rb") as f:
        if Path(graph).stat().st_size == 0:
            raise BadModelFileError(f"{graph}: the graph file is empty; re-export the model")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            buf = memoryview(mm)
            try:
                found: list[dict[str, str]] = []
                _walk(buf, 0, len(buf), "model", 0, found)
                return found
            except _Malformed:
                raise BadModelFileError(f"{graph}: not a valid ONNX file; re-export the model") from None
            finally:
                buf.release()


def check_external_data(graph: Path) -> None:
    """Refuse a graph whose weights point outside its own folder (an absolute path, "..", a
    symlink that leads out) or past the end of their file."""
    folder = Path(graph).parent.resolve()
    sizes: dict[str, int] = {}  # location -> its file's size; each location is checked once
    for info in external_data(graph):
        location = info.get("location", "")
        if location not in sizes:
            path = Path(location)
            if path.is_absolute() or folder not in (folder / path).resolve().parents:
                raise BadModelFileError(
                    f"{graph}: its weights point outside the model folder ({location!r}); refusing to read them — "
                    "re-export the model or use a folder from a source you trust"
                )
            if not (folder / path).is_file():
                raise BadModelFileError(f"{folder / path}: the weights file is missing; re-export the model")
            sizes[location] = (folder / path).stat().st_size
        end = _int(info.get("offset", "0")) + _int(info.get("length", "0"))
        if end > sizes[location]:
            raise BadModelFileError(
                f"{folder / location}: truncated (a tensor needs bytes up to {end}, the file has {sizes[location]}); "
                "re-export or re-download the model"
            )


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


def _walk(buf: memoryview, pos: int, end: int, kind: str, depth: int, found: list[dict[str, str]]) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    children = _CHILDREN.get(kind, {})
    if kind == "tensor":
        entries = [_entry(buf, start, stop) if start >= 0 else ("", "")  # a non-message entry: unnamed
                   for field, start, stop, _ in _spans(buf, pos, end) if field == 13]
        if entries:
            found.append(dict(entries))
        return
    for field, start, stop, _ in _spans(buf, pos, end):
        if field in children and start >= 0:
            _walk(buf, start, stop, children[field], depth + 1, found)


def _entry(buf: memoryview, pos: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto: (key, value)."""
    kv = {field: bytes(buf[start:stop]).decode("utf-8", "replace") for field, start, stop, _ in _spans(buf, pos, end)
          if start >= 0}
    return kv.get(1, ""), kv.get(2, "")


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


# ---- relocating external data ---------------------------------------------------------------

def relocate(graph: bytes, move: Callable[[dict[str, str]], dict[str, str]]) -> bytes:
    """The serialized graph with every tensor's external_data entries replaced by
    move(entries) (a dict of the same keys, new values), everything else byte for byte.
    Used to point a graph inside a bundle at its weights where they lie in the bundle."""
    graph = bytes(graph)
    try:
        return _rewrite(graph, memoryview(graph), 0, len(graph), "model", 0, move)
    except _Malformed:
        raise BadModelFileError("the graph is not a valid ONNX file; re-export the model") from None


_LOCATION = b"location"  # every external-data entry names its file under this key


def _rewrite(raw: bytes, buf: memoryview, pos: int, end: int, kind: str, depth: int,
             move: Callable[[dict[str, str]], dict[str, str]]) -> bytes:
    if depth > _MAX_DEPTH:
        raise _Malformed
    children = _CHILDREN.get(kind, {})
    if kind == "tensor":
        spans = list(_spans(buf, pos, end))
        entries = [_entry(buf, start, stop) for field, start, stop, _ in spans if field == 13 and start >= 0]
        if not entries:
            return raw[pos:end]
        moved = move(dict(entries))
        out, done = [], False
        for field, start, stop, head in spans:
            if field != 13:
                out.append(raw[head:stop])
            elif not done:  # all entries, in their original order, where the first one was
                out.extend(_len_field(13, _string_field(1, k) + _string_field(2, moved[k])) for k, _ in entries)
                done = True
        return b"".join(out)
    out = []
    for field, start, stop, head in _spans(buf, pos, end):
        # A child without the bytes "location" holds no external data: copied as it is
        # (most nodes), which keeps this to the initializers on a large graph.
        if field in children and start >= 0 and raw.find(_LOCATION, start, stop) >= 0:
            out.append(_len_field(field, _rewrite(raw, buf, start, stop, children[field], depth + 1, move)))
        else:
            out.append(raw[head:stop])
    return b"".join(out)


def _spans(buf: memoryview, pos: int, end: int) -> Iterator[tuple[int, int, int, int]]:
    """(field, start, stop, head) per field: head is where its tag begins; for a
    length-delimited field start/stop bound its payload, otherwise start is -1 and stop is
    where the field ends."""
    while pos < end:
        head = pos
        key = buf[pos]  # one-byte keys and lengths (fields < 16, short values) are the common case
        if key < 0x80:
            pos += 1
        else:
            key, pos = _varint(buf, pos, end)
        field, wire = key >> 3, key & 7
        if wire == 2:
            if pos < end and buf[pos] < 0x80:
                n = buf[pos]
                pos += 1
            else:
                n, pos = _varint(buf, pos, end)
            if pos + n > end:
                raise _Malformed
            yield field, pos, pos + n, head
            pos += n
        elif wire == 0:
            _, pos = _varint(buf, pos, end)
            yield field, -1, pos, head
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise _Malformed
            yield field, -1, pos, head
        else:
            raise _Malformed
    if pos != end:
        raise _Malformed


def fields(buf: memoryview, pos: int = 0, end: int | None = None) -> Iterator[tuple[int, int, int | None]]:
    """(field, start, value) per field of one message: a length-delimited field's payload
    starts at `start` (its bytes are buf[start:value]); a varint field has start -1 and its
    value. BadModelFileError-free: raises ValueError on a malformed message."""
    end = len(buf) if end is None else end
    try:
        for field, start, stop, head in _spans(buf, pos, end):
            if start >= 0:
                yield field, start, stop
            else:
                _, after_key = _varint(buf, head, stop)
                value = _varint(buf, after_key, stop)[0] if (buf[head] & 7) == 0 else None
                yield field, -1, value
    except _Malformed:
        raise ValueError("malformed protobuf message") from None


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _len_field(field: int, payload: bytes) -> bytes:
    return _encode_varint(field << 3 | 2) + _encode_varint(len(payload)) + payload


def _string_field(field: int, text: str) -> bytes:
    return _len_field(field, text.encode("utf-8"))
