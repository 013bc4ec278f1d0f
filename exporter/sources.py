"""Reading weights: safetensors (single or sharded) and GGUF, memory-mapped, validated.

Every header is untrusted: sizes and offsets are checked against the real file size
before anything is allocated, and each failure names the file and what is wrong.
Pickle checkpoints (.bin / .pt / .pth) are refused, never opened.
"""

from __future__ import annotations

import json
import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.runtime.errors import BadModelFileError, UnsupportedModelError

# ---- safetensors ---------------------------------------------------------------------------

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
_MAX_HEADER = 100 * 1024 * 1024  # the reference implementation's own cap


@dataclass(frozen=True)
class TensorRef:
    """Where one tensor lives: file, byte range, dtype name, shape."""

    path: Path
    start: int
    end: int
    dtype: str
    shape: tuple[int, ...]


def read_safetensors_header(path: Path) -> dict[str, TensorRef]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadModelFileError(f"{path}: truncated safetensors file ({size} bytes, no header); re-download it")
        (n,) = struct.unpack("<Q", head)
        if n > min(_MAX_HEADER, size - 8):
            limit = f"the file has {size}" if n > size - 8 else f"the format allows at most {_MAX_HEADER}"
            raise BadModelFileError(
                f"{path}: safetensors header claims {n} bytes but {limit}; the file is truncated or corrupt, re-download it"
            )
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadModelFileError(f"{path}: safetensors header is not valid JSON ({exc}); re-download the file") from None
    if not isinstance(header, dict):
        raise BadModelFileError(f"{path}: safetensors header is not a JSON object; re-download the file")
    header.pop("__metadata__", None)
    refs = {name: _tensor_ref(path, name, info, 8 + n, size) for name, info in header.items()}
    _check_no_overlap(path, refs)
    return refs


def _tensor_ref(path: Path, name: str, info: Any, base: int, size: int) -> TensorRef:
    try:
        dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        ok = all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(start, int) and isinstance(end, int)
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise BadModelFileError(f"{path}: tensor {name!r} has a malformed header entry; re-download the file")
    if not isinstance(dtype, str) or dtype not in _ST_DTYPES:
        raise UnsupportedModelError(f"{path}: tensor {name!r} has dtype {dtype!r}, which is not supported; "
                                    f"re-save the model in one of {', '.join(_ST_DTYPES)}")
    nbytes = int(np.prod(shape, dtype=object)) * np.dtype(_ST_DTYPES[dtype]).itemsize
    if not 0 <= start <= end or end - start != nbytes or base + end > size:
        raise BadModelFileError(
            f"{path}: tensor {name!r} claims bytes {start}..{end} (shape {list(shape)}, {dtype}) "
            f"but the file holds {size - base} data bytes; the file is truncated or corrupt, re-download it"
        )
    return TensorRef(path, base + start, base + end, dtype, shape)


def _check_no_overlap(path: Path, refs: dict[str, TensorRef]) -> None:
    last_end, last_name = -1, None
    for name, ref in sorted(refs.items(), key=lambda item: (item[1].start, item[1].end)):
        if ref.start < last_end and ref.end > ref.start:
            raise BadModelFileError(f"{path}: tensors {last_name!r} and {name!r} overlap in the file; "
                                    "the file is corrupt, re-download it")
        if ref.end > last_end:
            last_end, last_name = ref.end, name


SAFETENSORS_FLOATS = ("F64", "F32", "F16", "BF16")


def load_safetensor(ref: TensorRef, mm: mmap.mmap, rows: slice = slice(None)) -> np.ndarray:
    """float32 values (bf16 widened exactly) of a float tensor, or of `rows` of its first axis."""
    dtype = np.dtype(_ST_DTYPES[ref.dtype])
    raw = np.frombuffer(mm, dtype=dtype, count=(ref.end - ref.start) // dtype.itemsize, offset=ref.start)
    raw = raw.reshape(ref.shape)
    raw = raw[rows] if raw.ndim > 1 else raw
    if ref.dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def release_pages(mm: mmap.mmap, start: int, end: int) -> None:
    """madvise(DONTNEED) the whole pages inside [start, end) once read: RSS stays flat."""
    page = mmap.PAGESIZE
    lo, hi = -(-start // page) * page, end // page * page
    if hi > lo and hasattr(mm, "madvise"):
        mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


# ---- GGUF ----------------------------------------------------------------------------------

GGUF_MAGIC = b"GGUF"
_GGUF_SCALARS = {  # value type id -> struct format
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
# Metadata arrays become Python lists (~40 bytes an element): cap their total so a lying file
# cannot turn its size into ten times as much memory. Llama 3's vocabulary, scores, types and
# merges come to ~0.7 M elements.
_MAX_METADATA_ELEMENTS = 1 << 23


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # numpy order (outermost first), i.e. GGUF dims reversed
    type: int  # ggml type id
    start: int
    end: int


class _Cursor:
    """Bounds-checked little-endian reads over a memory map."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path, self.size = buf, 0, path, len(buf)
        self.elements = 0  # metadata array elements read so far

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > self.size:
            raise BadModelFileError(
                f"{self.path}: {what} runs past the end of the file (offset {self.pos}, needs {n} bytes, "
                f"file has {self.size}); the file is truncated or corrupt, re-download it"
            )
        out = self.buf[self.pos:self.pos + n]
        self.pos += n
        return out

    def scalar(self, fmt: str, what: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.scalar("Q", what)
        try:
            return bytes(self.take(n, what)).decode("utf-8")
        except UnicodeDecodeError:
            raise BadModelFileError(f"{self.path}: {what} is not valid UTF-8; the file is corrupt, re-download it") from None

    def value(self, vtype: int, what: str):
        if vtype in _GGUF_SCALARS:
            return self.scalar(_GGUF_SCALARS[vtype], what)
        if vtype == _GGUF_STRING:
            return self.string(what)
        if vtype == _GGUF_ARRAY:
            return self.array(what)
        raise BadModelFileError(f"{self.path}: {what} has unknown value type {vtype}; the file is corrupt, re-download it")

    def array(self, what: str):
        etype, n = self.scalar("I", what), self.scalar("Q", what)
        self.elements += n
        if self.elements > _MAX_METADATA_ELEMENTS:
            raise BadModelFileError(
                f"{self.path}: {what} brings the metadata to {self.elements} array elements, more than "
                f"{_MAX_METADATA_ELEMENTS} (no tokenizer needs that many); the file is corrupt, re-download it"
            )
        if etype in _GGUF_SCALARS:
            fmt = _GGUF_SCALARS[etype]
            raw = self.take(n * struct.calcsize(fmt), what)
            return np.frombuffer(raw, dtype="<" + fmt).tolist()
        if n > self.size - self.pos:  # each element takes at least one byte
            raise BadModelFileError(f"{self.path}: {what} claims {n} elements, more than the file holds; "
                                    "the file is corrupt, re-download it")
        return [self.value(etype, what) for _ in range(n)]


class GGUFFile:
    """A parsed GGUF: metadata dict, tensor table, and raw tensor bytes on demand."""

    def __init__(self, path: Path):
        self.path = Path(path)
        with open(self.path, "rb") as f:
            if self.path.stat().st_size == 0:
                raise BadModelFileError(f"{self.path}: empty file; re-download the GGUF")
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        cur = _Cursor(self._mm, self.path)
        magic = bytes(cur.take(4, "magic"))
        if magic != GGUF_MAGIC:
            raise BadModelFileError(f"{self.path}: not a GGUF file (magic {magic!r}, expected b'GGUF'); "
                                    "give a .gguf file or a Hugging Face model folder")
        version = cur.scalar("I", "version")
        if version not in (2, 3):
            raise UnsupportedModelError(f"{self.path}: GGUF version {version} is not supported (2 or 3); "
                                        "re-convert the model with llama.cpp's convert_hf_to_gguf.py")
        n_tensors, n_kv = cur.scalar("Q", "tensor count"), cur.scalar("Q", "metadata count")
        # A tensor entry takes >= 24 bytes and a metadata entry >= 13: cap counts by the file size.
        if n_tensors * 24 + n_kv * 13 > cur.size:
            raise BadModelFileError(
                f"{self.path}: header claims {n_tensors} tensors and {n_kv} metadata entries, "
                f"more than a {cur.size}-byte file can hold; the file is corrupt, re-download it"
            )
        self.metadata: dict[str, Any] = {}
        for i in range(n_kv):
            key = cur.string(f"metadata key #{i}")
            self.metadata[key] = cur.value(cur.scalar("I", f"metadata {key!r} type"), f"metadata {key!r}")
        infos = [self._tensor_info(cur, i) for i in range(n_tensors)]
        align = self.metadata.get("general.alignment", 32)
        if not isinstance(align, int) or align <= 0 or align & (align - 1):
            raise BadModelFileError(f"{self.path}: general.alignment {align!r} is not a power of two; "
                                    "the file is corrupt, re-download it")
        data = -(-cur.pos // align) * align
        self.tensors = {info[0]: self._locate(info, data) for info in infos}

    def _tensor_info(self, cur: _Cursor, i: int):
        name = cur.string(f"tensor #{i} name")
        n_dims = cur.scalar("I", f"tensor {name!r} rank")
        if n_dims > 8:
            raise BadModelFileError(f"{self.path}: tensor {name!r} claims {n_dims} dimensions (at most 8); "
                                    "the file is corrupt, re-download it")
        dims = [cur.scalar("Q", f"tensor {name!r} dims") for _ in range(n_dims)]
        ttype, offset = cur.scalar("I", f"tensor {name!r} type"), cur.scalar("Q", f"tensor {name!r} offset")
        return name, tuple(reversed(dims)), ttype, offset

    def _locate(self, info, data_start: int) -> GGUFTensor:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        name, shape, ttype, offset = info
        try:
            qtype = GGMLQuantizationType(ttype)
            block, block_bytes = GGML_QUANT_SIZES[qtype]
        except (ValueError, KeyError):
            raise UnsupportedModelError(f"{self.path}: tensor {name!r} has unknown ggml type {ttype}; "
                                        "re-convert the model to a common type (F16, Q8_0, Q4_K ...)") from None
        n = int(np.prod(shape, dtype=object))
        if shape and shape[-1] % block:
            raise BadModelFileError(f"{self.path}: tensor {name!r} row of {shape[-1]} is not a multiple of "
                                    f"{qtype.name}'s block {block}; the file is corrupt, re-download it")
        nbytes = n // block * block_bytes
        start = data_start + offset
        if start + nbytes > len(self._mm):
            raise BadModelFileError(
                f"{self.path}: tensor {name!r} ({qtype.name}, shape {list(shape)}) needs bytes "
                f"{start}..{start + nbytes} but the file ends at {len(self._mm)}; the file is truncated, re-download it"
            )
        return GGUFTensor(name, shape, ttype, start, start + nbytes)

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.end - t.start, offset=t.start)

    def release(self, name: str, rows: slice = slice(None)) -> None:
        """Drop the file pages of a tensor already read from this process's resident set."""
        t = self.tensors[name]
        outer = t.shape[0] if len(t.shape) > 1 else 1
        start, stop, _ = rows.indices(outer)
        row_bytes = (t.end - t.start) // outer
        release_pages(self._mm, t.start + start * row_bytes, t.start + stop * row_bytes)

    def type_name(self, name: str) -> str:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(self.tensors[name].type).name

    def close(self) -> None:
        try:
            self._mm.close()
        except BufferError:  # arrays still view the map; it closes when they are gone
            pass


# GGUF tensor types the exporter dequantizes to float; others are refused by name.
GGUF_FLOAT_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K", "Q5_0", "Q5_1", "Q5_K", "Q8_K", "Q3_K", "Q2_K")


def dequantize_gguf(gf: GGUFFile, name: str, rows: slice = slice(None)) -> np.ndarray:
    """float32 values of one GGUF tensor (or of `rows` of its outermost axis), exactly as
    gguf-py dequantizes them."""
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    t = gf.tensors[name]
    tname = gf.type_name(name)
    if tname not in GGUF_FLOAT_TYPES:
        raise UnsupportedModelError(
            f"{gf.path}: tensor {name!r} has type {tname}, which is not supported; "
            f"supported: {', '.join(GGUF_FLOAT_TYPES)}"
        )
    outer = t.shape[0] if len(t.shape) > 1 else 1
    raw = gf.raw(name).reshape(outer, -1)[rows]  # (rows, bytes per row)
    shape = (raw.shape[0], *t.shape[1:]) if len(t.shape) > 1 else t.shape
    if tname == "F32":
        out = raw.view(np.float32)
    elif tname == "F16":
        out = raw.view(np.float16).astype(np.float32)
    elif tname == "BF16":
        out = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    else:
        out = dequantize(raw, GGMLQuantizationType(t.type)).astype(np.float32, copy=False)
    gf.release(name, rows)
    return out.reshape(shape)
