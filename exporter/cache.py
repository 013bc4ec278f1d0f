"""Run any source directly: a GGUF file or a Hugging Face folder is exported once into a
cache and the exported folder is reused by later runs.

    root = cache_root()                        # $XDG_CACHE_HOME/edgellama, else ~/.cache/edgellama
    folder = exported(Path("model.gguf"))      # exports on the first call, reuses afterwards

An entry is keyed by the source's identity (resolved path, and the size and modification
time of every file the export reads) and the export options, so an edited or replaced
source is exported again. Entries live in ``<root>/models/<key>/`` as ``model/`` (the
exported folder) and ``entry.json`` (source, options, when made); ``last_used`` is the
mtime of ``entry.json``. Two processes exporting the same source at once: the second waits
on a lock file (POSIX) and reuses the first's folder; without locks, the export's atomic
rename still leaves one complete folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from edgellama import __version__
from edgellama.runtime import contract as io
from edgellama.runtime.errors import BadArgumentError

GGUF_MAGIC = b"GGUF"
ENTRY_NAME = "entry.json"
MODEL_NAME = "model"

# GGUF tensor types -> the bits `--bits auto` exports them at (the file's own precision).
_GGUF_BITS = {"Q4_0": 4, "Q4_1": 4, "Q4_K": 4, "Q5_0": 4, "Q5_1": 4, "Q5_K": 4, "IQ4_NL": 4, "IQ4_XS": 4,
              "Q2_K": 4, "Q3_K": 4, "Q6_K": 8, "Q8_0": 8, "Q8_1": 8, "Q8_K": 8}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "edgellama"


def models_root() -> Path:
    return cache_root() / "models"


def is_gguf(path: Path) -> bool:
    path = Path(path)
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == GGUF_MAGIC
    except OSError:
        return False


def is_hf_folder(path: Path) -> bool:
    """A Hugging Face checkpoint folder (config.json and weights), not an exported folder."""
    path = Path(path)
    return (path.is_dir() and (path / "config.json").is_file() and not (path / io.MANIFEST_NAME).is_file()
            and not (path / io.GRAPH_NAME).is_file() and not (path / io.GENAI_CONFIG_NAME).is_file()
            and any(path.glob("*.safetensors")))


def needs_export(path: Path) -> bool:
    return is_gguf(path) or is_hf_folder(path)


def _source_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(f for f in source.iterdir() if f.is_file() and not f.name.startswith("."))


def gguf_bits(path: Path) -> int | None:
    """The bits `auto` exports a GGUF at: the precision holding most of its weight bytes
    (4 for Q4/Q5 types, 8 for Q8_0/Q6_K), None (float) for F16/BF16/F32 files."""
    from .sources import GGUFFile

    gf = GGUFFile(path)
    try:
        weight: dict[int | None, int] = {}
        for name, t in gf.tensors.items():
            bits = _GGUF_BITS.get(gf.type_name(name))
            size = t.end - t.start
            weight[bits] = weight.get(bits, 0) + size
    finally:
        gf.close()
    return max(weight, key=weight.get) if weight else None


@dataclass(frozen=True)
class Entry:
    key: str
    folder: Path  # <root>/models/<key>
    source: str
    options: dict
    created: float
    last_used: float
    size: int

    @property
    def model(self) -> Path:
        return self.folder / MODEL_NAME

    def describe_options(self) -> str:
        bits = self.options.get("bits")
        return f"int{bits}" if bits else self.options.get("dtype", "fp32")


def _key(source: Path, options: dict) -> str:
    identity = [(str(f.relative_to(source.parent) if source.is_file() else f.relative_to(source)),
                 f.stat().st_size, f.stat().st_mtime_ns) for f in _source_files(source)]
    blob = json.dumps({"source": str(source), "files": identity, "options": options, "version": __version__},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def export_options(source: Path, bits: int | None | str = "auto") -> dict:
    """The export options a cached export of `source` uses: `bits` "auto" keeps a GGUF's own
    precision (int4 for Q4 files) and exports a Hugging Face folder in fp32."""
    if bits == "auto":
        bits = gguf_bits(source) if is_gguf(source) else None
    return {"dtype": "fp32", "bits": bits}


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    try:
        import fcntl
    except ImportError:  # Windows: the export's atomic rename is the only guard
        yield
        return
    with open(path, "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def exported(source: Path, bits: int | None | str = "auto",
             progress: Callable[[int, int, str], None] = lambda done, total, what: None,
             notify: Callable[[str], None] = lambda line: None) -> Path:
    """The exported folder for a GGUF file or Hugging Face folder, exporting it on first use."""
    source = Path(source).resolve()
    if not source.exists():
        raise BadArgumentError(f"{source}: no such file or folder")
    if not needs_export(source):
        raise BadArgumentError(f"{source}: not a .gguf file nor a Hugging Face folder (config.json + *.safetensors)")
    # Keyed by the bits asked for: what "auto" resolves to follows from the source's files,
    # which the key already covers, so a cached run never parses the GGUF (0.34 s for SmolLM2).
    key = _key(source, {"dtype": "fp32", "bits": bits})
    entry = models_root() / key
    model = entry / MODEL_NAME
    entry.mkdir(parents=True, exist_ok=True)
    with _locked(models_root() / f"{key}.lock"):
        if not ((entry / ENTRY_NAME).is_file() and (model / io.MANIFEST_NAME).is_file()):
            from edgellama.buildkit.quant_options import QuantOptions

            from .export import ExportOptions, export

            options = export_options(source, bits)
            what = f"int{options['bits']}" if options["bits"] else options["dtype"]
            notify(f"exporting {source.name} ({what}) once into {model}; later runs reuse it")
            quant = QuantOptions(bits=options["bits"], force=True) if options["bits"] else None
            export(source, model, ExportOptions(dtype=options["dtype"], force=True, quant=quant), progress)
            meta = {"source": str(source), "options": options, "created": time.time(), "version": __version__}
            tmp = entry / f".{ENTRY_NAME}.{os.getpid()}"
            tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            os.replace(tmp, entry / ENTRY_NAME)
        else:
            os.utime(entry / ENTRY_NAME)  # last used
    return model


def entries() -> list[Entry]:
    """Every complete cache entry, most recently used first."""
    root = models_root()
    found = []
    if not root.is_dir():
        return found
    for folder in root.iterdir():
        meta = folder / ENTRY_NAME
        if not folder.is_dir() or not meta.is_file():
            continue
        try:
            data = json.loads(meta.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        size = sum(f.stat().st_size for f in (folder / MODEL_NAME).rglob("*") if f.is_file())
        found.append(Entry(folder.name, folder, data.get("source", "?"), data.get("options", {}),
                           data.get("created", 0.0), meta.stat().st_mtime, size))
    return sorted(found, key=lambda e: e.last_used, reverse=True)


def remove(selectors: list[str], everything: bool = False) -> list[Entry]:
    """Remove the entries whose key starts with a selector or whose source is a selector's
    path; all of them with `everything`. Returns what was removed."""
    if not selectors and not everything:
        raise BadArgumentError("name what to remove: an ID from `edgellama cache list`, a source path, or --all")
    chosen = []
    for e in entries():
        if everything or any(e.key.startswith(s) or e.source == str(Path(s).resolve()) for s in selectors if s):
            chosen.append(e)
    if not chosen and not everything:
        raise BadArgumentError(f"no cache entry matches {', '.join(selectors)}; see `edgellama cache list`")
    for e in chosen:
        shutil.rmtree(e.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (e.folder.parent / f"{e.key}.lock").unlink()
    return chosen
