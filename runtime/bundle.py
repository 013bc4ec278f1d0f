"""Reading a bundle (`edgellama pack`, written by `edgellama.deploy`) before the runtime runs it.

A bundle is one zip (every entry stored, uncompressed, data 4 KiB aligned) holding a model
folder and ``SHA256SUMS``. `unpacking` checks every entry's name, copies the small files
into a private temporary folder and checks each copy's SHA-256; the weight data stays where
it is, the graph pointed at it, and is hashed in place by the `Unpacked.check` the loader
runs beside the session build. `unpacked` copies and checks everything. The folder is
removed when the `with` ends. A compiled bundle's graph is then checked by artifact.py.
"""

from __future__ import annotations

# zipfile, tempfile, hashlib & co. are imported where bundles are read: a folder's load
# path does not pay for them (it runs before the session build, on the critical path).

import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from . import contract as io
from .errors import BadArgumentError, BadModelFileError
from .external_data import relocate

if TYPE_CHECKING:
    import zipfile

BUNDLE_SUMS = "SHA256SUMS"
# Per-stretch SHA-256s of the large files ({"chunk_bytes": n, "files": {name: [hex, ...]}}),
# itself listed in SHA256SUMS: the weights can then be checked on several cores at once.
BUNDLE_CHUNKS = "SHA256CHUNKS"
_SUMS_MAX_BYTES = 1 << 20
_CHUNK = 1 << 22
_HASH_STRETCH = 1 << 24  # bytes hashed between two MADV_DONTNEED calls


def is_bundle(path: Path) -> bool:
    """A file given where a model folder is expected is read as a bundle."""
    return Path(path).is_file()


@contextmanager
def unpacked(bundle: Path) -> Iterator[Path]:
    """Yield a private folder holding the bundle's files, each checked against SHA256SUMS
    as it is copied; nothing is yielded unless every file matches."""
    with unpacking(bundle, in_place=False) as opened:
        opened.check()
        yield opened.folder


@dataclass
class Unpacked:
    """A bundle opened for loading. `folder`: a private folder with its files, each checked
    against SHA256SUMS — except the weight data, which `check` verifies when called (the
    caller hashes it beside the session build; hashlib releases the GIL). When `graph` is
    set, the weight data was not copied out: `graph` is the (checked) graph with its
    external data pointed at the data's place inside the bundle, to open from bytes with
    external data folder `data_folder`. Nothing built from the weights may be used before
    `check` has returned."""

    folder: Path
    check: "Deferred"
    graph: bytes | None = None
    data_folder: Path | None = None


@contextmanager
def unpacking(bundle: Path, in_place: bool = True) -> Iterator[Unpacked]:
    """Open a bundle for loading (see `Unpacked`); with in_place=False the weight data is
    copied out too (and still checked only when `check` is called)."""
    import shutil
    import tempfile
    import zipfile

    bundle = Path(bundle)
    try:
        zf = zipfile.ZipFile(bundle)
    except (zipfile.BadZipFile, OSError) as exc:
        raise BadModelFileError(f"{bundle}: not a model folder nor an edgellama bundle ({exc}); "
                                "pass a folder from 'edgellama export' or a file from 'edgellama pack'") from None
    with zf:
        sums = _read_sums(bundle, zf)
        entries = {info.filename: info for info in _check_entries(bundle, zf, sums)}
        tmp = Path(tempfile.mkdtemp(prefix="edgellama-bundle-"))
        try:
            chunks = _read_chunks(bundle, zf, entries.pop(BUNDLE_CHUNKS, None), sums)
            with open(bundle, "rb") as raw:
                for name, info in entries.items():
                    if name != io.GRAPH_DATA_NAME:
                        _extract(bundle, raw, info, tmp)
                        _verify(bundle, tmp / name, sums[name])
                data = entries.get(io.GRAPH_DATA_NAME)
                if data is None:
                    yield Unpacked(tmp, Deferred(bundle, []))
                    return
                digest, size = sums[io.GRAPH_DATA_NAME], data.file_size
                stretches = _stretches(bundle, chunks, io.GRAPH_DATA_NAME, size)
                start = _data_start(bundle, raw, data)
                graph = _point_into(bundle, tmp / io.GRAPH_NAME, start, size) if in_place else None
                if graph is not None:
                    real = bundle.resolve()
                    yield Unpacked(tmp, Deferred(bundle, [(real, digest, start, size, stretches)]), graph, real.parent)
                    return
                _extract(bundle, raw, data, tmp)
            yield Unpacked(tmp, Deferred(bundle, [(tmp / io.GRAPH_DATA_NAME, digest, 0, size, stretches)]))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _point_into(bundle: Path, graph: Path, start: int, size: int) -> bytes | None:
    """`graph`'s bytes with every external-data entry moved to where model.onnx.data lies
    inside the bundle (offsets shifted by `start`, including onnxruntime's prepacked-weight
    entries, "<kernel>+<hash>|<offset>;<length>;<flags>"), or None when an entry names
    another file, does not fit the data, or is not understood: then the data is copied."""
    if not graph.is_file():
        return None
    location = bundle.resolve().name

    class Unmovable(Exception):
        pass

    def moved(offset: str, length: str) -> str:
        """The offset inside the bundle of a span of the data member."""
        if not (offset.isdigit() and length.isdigit()) or int(offset) + int(length) > size:
            raise Unmovable
        return str(int(offset) + start)

    def shift(span: str) -> str:  # "<offset>;<length>;<flags>"
        offset, length, *rest = span.split(";")
        return ";".join([moved(offset, length), length, *rest])

    def move(entries: dict[str, str]) -> dict[str, str]:
        if entries.get("location") != io.GRAPH_DATA_NAME or set(entries) - {"location", "offset", "length"} \
                - {k for k in entries if k.startswith("prepacked_")}:
            raise Unmovable
        if "length" not in entries:  # "to the end of the file": not expressible inside a bundle
            raise Unmovable
        out = {**entries, "location": location, "offset": moved(entries.get("offset", "0"), entries["length"])}
        for key in entries:
            if key.startswith("prepacked_"):
                kernel, *spans = entries[key].split("|")
                if not spans:
                    raise Unmovable
                out[key] = "|".join([kernel, *map(shift, spans)])
        return out

    try:
        return relocate(graph.read_bytes(), move)
    except (Unmovable, BadModelFileError):
        return None


class Deferred:
    """Checksums still to check: (file, SHA-256, start, size, stretches) where stretches is
    None (one SHA-256 over the whole span) or [(offset, length, SHA-256), ...] covering
    it, hashed on several threads. Calling it checks them (once; later calls repeat the
    outcome), raising BadModelFileError on a mismatch. Thread-safe."""

    def __init__(self, bundle: Path, files: list[tuple[Path, str, int, int, list | None]]):
        self.bundle, self.files = bundle, files
        self._lock = threading.Lock()
        self._error: BadModelFileError | None = None
        self._done = False

    def __call__(self) -> None:
        with self._lock:
            if not self._done:
                try:
                    for path, digest, start, size, stretches in self.files:
                        if not _matches(path, digest, start, size, stretches):
                            raise _corrupted(self.bundle, io.GRAPH_DATA_NAME)
                except BadModelFileError as exc:
                    self._error = exc
                self._done = True
            if self._error is not None:
                raise self._error


def _matches(path: Path, digest: str, start: int, size: int, stretches: list | None) -> bool:
    if stretches is None:
        return _sha256_file(path, start, size) == digest
    from .workers import shared

    pool = shared("edgellama-hash", max(1, min(4, os.cpu_count() or 1)))  # hashlib releases the GIL
    return all(pool.map(lambda s: _sha256_file(path, start + s[0], s[1]) == s[2], stretches))


def _read_chunks(bundle: Path, zf: zipfile.ZipFile, info: zipfile.ZipInfo | None, sums: dict[str, str]) -> dict | None:
    """The checked SHA256CHUNKS record, or None when the bundle has none (older packs)."""
    if info is None:
        return None
    import hashlib
    import json

    bad = f"{bundle}: {BUNDLE_CHUNKS} is malformed; re-pack the model"
    if info.file_size > _SUMS_MAX_BYTES:
        raise BadModelFileError(bad)
    data = zf.read(info)
    if hashlib.sha256(data).hexdigest() != sums[BUNDLE_CHUNKS]:
        raise _corrupted(bundle, BUNDLE_CHUNKS)
    try:
        record = json.loads(data.decode("utf-8"))
        step, files = record["chunk_bytes"], record["files"]
        if not isinstance(step, int) or step < 4096 or not isinstance(files, dict) or not all(
                isinstance(v, list) and all(isinstance(h, str) and len(h) == 64 for h in v) for v in files.values()):
            raise ValueError
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise BadModelFileError(bad) from None
    return record


def _stretches(bundle: Path, chunks: dict | None, name: str, size: int) -> list[tuple[int, int, str]] | None:
    if chunks is None or name not in chunks["files"]:
        return None
    step, digests = chunks["chunk_bytes"], chunks["files"][name]
    if len(digests) != max(1, -(-size // step)):
        raise BadModelFileError(f"{bundle}: {BUNDLE_CHUNKS} does not cover {name}; re-pack the model")
    return [(i * step, min(step, size - i * step), h) for i, h in enumerate(digests)]


def safe_member_name(name: str) -> bool:
    """A plain file name: no folders, no parent references, nothing absolute or hidden."""
    return (bool(name) and "/" not in name and "\\" not in name and "\x00" not in name
            and ":" not in name and not name.startswith(".") and len(name) <= 255)


def parse_sums(text: str) -> dict[str, str]:
    """'<64 hex>  <name>' lines (sha256sum's format) -> {name: hex}; ValueError if malformed."""
    sums: dict[str, str] = {}
    for line in text.splitlines():
        digest, sep, name = line.partition("  ")
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest) \
                or not safe_member_name(name) or name in sums:
            raise ValueError(f"bad line {line[:120]!r}")
        sums[name] = digest
    return sums


def _read_sums(bundle: Path, zf: zipfile.ZipFile) -> dict[str, str]:
    import zipfile

    try:
        info = zf.getinfo(BUNDLE_SUMS)
    except KeyError:
        raise BadModelFileError(f"{bundle}: no {BUNDLE_SUMS} inside; not a bundle from 'edgellama pack'") from None
    if info.file_size > _SUMS_MAX_BYTES:
        raise BadModelFileError(f"{bundle}: {BUNDLE_SUMS} is {info.file_size} bytes; not a bundle from 'edgellama pack'")
    try:
        sums = parse_sums(zf.read(info).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, zipfile.BadZipFile) as exc:
        raise BadModelFileError(f"{bundle}: {BUNDLE_SUMS} is malformed ({exc}); re-pack the model") from None
    if io.MANIFEST_NAME not in sums:
        raise BadModelFileError(f"{bundle}: {BUNDLE_SUMS} does not list {io.MANIFEST_NAME}; re-pack the model")
    return sums


def _check_entries(bundle: Path, zf: zipfile.ZipFile, sums: dict[str, str]) -> list[zipfile.ZipInfo]:
    """Every entry a stored, plain, listed file; every listed file present exactly once."""
    import stat
    import zipfile

    seen: set[str] = set()
    entries = []
    for info in zf.infolist():
        name = info.filename
        if not safe_member_name(name):
            raise BadModelFileError(f"{bundle}: entry {name!r} is not a plain file name (folders, '..' and absolute "
                                    "paths are refused); the bundle is damaged or was tampered with")
        if name in seen:
            raise BadModelFileError(f"{bundle}: entry {name!r} appears twice; the bundle was tampered with")
        seen.add(name)
        if info.is_dir() or stat.S_IFMT(info.external_attr >> 16) not in (0, stat.S_IFREG):  # 0: type unset
            raise BadModelFileError(f"{bundle}: entry {name!r} is not a regular file; the bundle was tampered with")
        if info.compress_type != zipfile.ZIP_STORED:
            raise BadModelFileError(f"{bundle}: entry {name!r} is compressed; 'edgellama pack' stores files as they are")
        if name != BUNDLE_SUMS:
            if name not in sums:
                raise BadModelFileError(f"{bundle}: entry {name!r} is not listed in {BUNDLE_SUMS}; "
                                        "the bundle was tampered with")
            entries.append(info)
    missing = sorted(set(sums) - seen)
    if missing:
        raise BadModelFileError(f"{bundle}: {', '.join(missing)} listed in {BUNDLE_SUMS} but missing; "
                                "the bundle is incomplete")
    return entries


def _extract(bundle: Path, raw, info: zipfile.ZipInfo, folder: Path) -> None:
    """Copy one stored entry out (in the kernel where it can). zipfile's CRC pass is
    skipped: SHA-256 decides, computed on the copy (`_verify`), which is exactly what
    will be loaded."""
    start = _data_start(bundle, raw, info)
    target = folder / info.filename  # a plain name (checked): stays inside `folder`
    try:
        with open(target, "xb") as dst:
            _copy_range(raw, dst, start, info.file_size)
    except OSError as exc:
        raise BadArgumentError(f"{folder}: cannot unpack {bundle} here ({exc.strerror}); set TMPDIR to a "
                               "folder with room for the model") from None


def _verify(bundle: Path, copy: Path, digest: str) -> None:
    if _sha256_file(copy) != digest:
        raise _corrupted(bundle, copy.name)


def _corrupted(bundle: Path, name: str) -> BadModelFileError:
    return BadModelFileError(f"{bundle}: {name} is corrupted or was modified (its SHA-256 does not match "
                             f"{BUNDLE_SUMS}); refusing to load it: copy the bundle again or re-pack it")


def _data_start(bundle: Path, raw, info: zipfile.ZipInfo) -> int:
    """Where a stored entry's bytes begin: after its local header, which must agree with
    the central directory."""
    import struct

    raw.seek(info.header_offset)
    header = raw.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise BadModelFileError(f"{bundle}: {info.filename}: damaged local header; copy the bundle again")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    if raw.read(name_len) != info.filename.encode("utf-8"):
        raise BadModelFileError(f"{bundle}: {info.filename}: local header names another file; the bundle was "
                                "tampered with")
    start = info.header_offset + 30 + name_len + extra_len
    if start + info.file_size > os.fstat(raw.fileno()).st_size:
        raise BadModelFileError(f"{bundle}: {info.filename} is truncated; copy the bundle again")
    return start


def _copy_range(src, dst, start: int, size: int) -> None:
    copied = 0
    try:  # Linux: no trip through user space (and a reflink on filesystems that have them)
        while copied < size:
            n = os.copy_file_range(src.fileno(), dst.fileno(), size - copied, start + copied)
            if n == 0:
                break
            copied += n
    except (AttributeError, OSError):  # not Linux, or a filesystem pair it cannot handle
        pass
    src.seek(start + copied)
    dst.seek(copied)
    while copied < size:
        chunk = src.read(min(_CHUNK, size - copied))
        if not chunk:
            raise OSError(5, "unexpected end of the bundle")
        dst.write(chunk)
        copied += len(chunk)


def _sha256_file(path: Path, start: int = 0, size: int | None = None) -> str:
    """SHA-256 of a file, or of `size` bytes of it from `start`, hashed through a mapping
    (hashlib releases the GIL and reads the pages in place: faster than read() into a
    buffer). Each hashed stretch is unmapped from this process again (MADV_DONTNEED: the
    pages stay in the page cache), so checking a bundle does not add its size to RSS."""
    import hashlib
    import mmap

    h = hashlib.sha256()
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        size = total - start if size is None else size
        if start + size > total:
            raise BadModelFileError(f"{path}: shorter than its entries say; copy it again")
        if not size:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            view = memoryview(m)
            try:
                at, end = start, start + size
                while at < end:
                    stop = min(end, (at // _HASH_STRETCH + 1) * _HASH_STRETCH)  # stretch boundaries: page-aligned
                    h.update(view[at:stop])
                    if hasattr(m, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                        first = at - at % mmap.PAGESIZE
                        m.madvise(mmap.MADV_DONTNEED, first, stop - first)
                    at = stop
            finally:
                view.release()
    return h.hexdigest()
