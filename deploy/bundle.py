"""`edgellama pack`: one file to ship a model folder (exported, quantized or compiled).

The bundle is a zip whose entries are all *stored* (not compressed: weights barely
compress, and stored data is copied at disk speed and can be memory-mapped), each
entry's data starting on a 4 KiB boundary (a zip "extra" field pads the local header,
as Android's zipalign does), plus ``SHA256SUMS`` in sha256sum's format and, for files over
64 MiB, ``SHA256CHUNKS`` (a SHA-256 per 64 MiB stretch, itself listed in SHA256SUMS) so
that the weights can be checked on several cores at once. The runtime
(runtime/bundle.py) checks names and checksums of every file before anything built from
it runs; the weight data is read and hashed in place, without a copy.

The checksums catch corruption and a file changed alone; whoever can rewrite the whole
bundle can rewrite SHA256SUMS too: compare the bundle's digest (printed by pack, the
SHA-256 of SHA256SUMS) with the publisher's to detect that.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zipfile
from pathlib import Path

from edgellama.buildkit.output import clear_stale_partials
from edgellama.runtime.bundle import BUNDLE_CHUNKS, BUNDLE_SUMS, safe_member_name
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError, OutputExistsError

ALIGN = 4096
_PAD_ID = 0xD935  # the extra-field id zipalign uses for padding
_LOCAL_HEADER = 30
_ZIP64_EXTRA = 20
_DATE = (2020, 1, 1, 0, 0, 0)  # fixed: the same folder packs to the same bytes
CHUNK_BYTES = 1 << 26  # 64 MiB stretches in SHA256CHUNKS


def pack(folder: Path, bundle: Path, force: bool = False, chunk_bytes: int = CHUNK_BYTES) -> str:
    """Write `bundle` from model folder `folder`, atomically; returns its digest. Files
    larger than `chunk_bytes` also get a SHA-256 per `chunk_bytes` stretch in
    SHA256CHUNKS (listed in SHA256SUMS), so a loader can check them on several cores."""
    folder, bundle = Path(folder), Path(bundle).absolute()
    files = _members(folder)
    if bundle.exists() and (not force or not bundle.is_file()):
        raise OutputExistsError(f"{bundle}: already exists; pass --force to replace it")
    if not bundle.parent.is_dir():
        raise BadArgumentError(f"{bundle.parent}: output's parent folder does not exist; create it first")
    clear_stale_partials(bundle)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{bundle.name}.{os.getpid()}-", suffix=".partial", dir=bundle.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw, zipfile.ZipFile(raw, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            lines, chunks = [], {}
            for f in files:
                digest, stretches = _add(zf, raw, f, chunk_bytes)
                lines.append(f"{digest}  {f.name}\n")
                if len(stretches) > 1:
                    chunks[f.name] = stretches
            if chunks:
                record = json.dumps({"chunk_bytes": chunk_bytes, "files": chunks}, indent=1).encode("utf-8")
                _add_bytes(zf, raw, BUNDLE_CHUNKS, record)
                lines.append(f"{hashlib.sha256(record).hexdigest()}  {BUNDLE_CHUNKS}\n")
            sums = "".join(lines)
            _add_bytes(zf, raw, BUNDLE_SUMS, sums.encode("utf-8"))
        os.chmod(tmp, 0o644)
        os.replace(tmp, bundle)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashlib.sha256(sums.encode("utf-8")).hexdigest()


def _members(folder: Path) -> list[Path]:
    """The folder's regular files, checked: a model folder with a manifest, plain names."""
    if not folder.is_dir():
        raise BadArgumentError(f"{folder}: not a model folder; pack a folder from 'edgellama export', "
                               "'quantize' or 'compile'")
    Manifest.load(folder)  # raises with the reason when this is no model folder
    files = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):
            continue  # editor and OS litter, partial writes
        if p.is_symlink() or not p.is_file():
            raise BadArgumentError(f"{p}: not a regular file; a model folder holds only files")
        if not safe_member_name(p.name) or p.name in (BUNDLE_SUMS, BUNDLE_CHUNKS):
            raise BadArgumentError(f"{p}: this file name cannot go into a bundle; rename or remove it")
        files.append(p)
    return files


def _info(zf: zipfile.ZipFile, raw, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
    """A ZipInfo whose data will start on an ALIGN boundary; (info, zip64)."""
    info = zipfile.ZipInfo(name, date_time=_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.external_attr = 0o100644 << 16  # a regular file, rw-r--r--
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule for a zip64 local header
    header = _LOCAL_HEADER + len(name.encode("utf-8")) + (_ZIP64_EXTRA if zip64 else 0) + 4
    pad = -(raw.tell() + header) % ALIGN
    info.extra = struct.pack("<HH", _PAD_ID, pad) + b"\0" * pad
    return info, zip64


def _add(zf: zipfile.ZipFile, raw, path: Path, chunk_bytes: int) -> tuple[str, list[str]]:
    """Stream one file into the zip; returns its SHA-256 and those of its chunk_bytes
    stretches."""
    info, zip64 = _info(zf, raw, path.name, path.stat().st_size)
    whole, stretch, stretches, filled = hashlib.sha256(), hashlib.sha256(), [], 0
    with open(path, "rb") as src, zf.open(info, "w", force_zip64=zip64) as dst:
        while data := src.read(min(1 << 22, chunk_bytes - filled)):
            whole.update(data)
            stretch.update(data)
            dst.write(data)
            filled += len(data)
            if filled == chunk_bytes:
                stretches.append(stretch.hexdigest())
                stretch, filled = hashlib.sha256(), 0
    if filled or not stretches:
        stretches.append(stretch.hexdigest())
    return whole.hexdigest(), stretches


def _add_bytes(zf: zipfile.ZipFile, raw, name: str, data: bytes) -> None:
    info, zip64 = _info(zf, raw, name, len(data))
    with zf.open(info, "w", force_zip64=zip64) as dst:
        dst.write(data)
