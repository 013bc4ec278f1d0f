"""A source checkpoint: config + tensors by logical name, from a HF folder or a GGUF file.

Tensors come back float32 in Hugging Face layout (out, in), shape-checked against
the ModelConfig. GGUF's q/k rows are permuted back from llama.cpp's interleaved
rotary layout so one graph serves both sources.
"""

from __future__ import annotations

import hashlib
import mmap
from pathlib import Path
from typing import Any

import numpy as np

from edgellama.runtime import contract as io
from edgellama.runtime.contract import read_json_object
from edgellama.runtime.errors import BadModelFileError, UnsupportedModelError

from .config import ModelConfig
from .names import GGUF_NAMES, GGUF_PERMUTED_QK, HF_NAMES, checkpoint_name, layer_weights
from .sources import (SAFETENSORS_FLOATS, GGUFFile, TensorRef, dequantize_gguf, load_safetensor,
                      read_safetensors_header, release_pages)
from .tokenizer import TokenizerFiles
from .tokenizer_gguf import tokenizer_from_gguf
from .tokenizer_hf import tokenizer_from_hf

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class Checkpoint:
    config: ModelConfig
    files: list[Path]

    def has(self, key: str, layer: int | None = None) -> bool:
        raise NotImplementedError

    def _shape(self, key: str, layer: int | None) -> tuple[int, ...]:
        """Checkpoint-layout shape, read from the header; raises if the tensor is missing."""
        raise NotImplementedError

    def _read(self, key: str, layer: int | None, rows: slice) -> np.ndarray:
        raise NotImplementedError

    def tokenizer(self) -> TokenizerFiles:
        raise NotImplementedError

    def get(self, key: str, layer: int | None = None, rows: slice = slice(None)) -> np.ndarray:
        """float32 (out, in) tensor, or `rows` of it; its full shape is checked against
        config.weight_shapes()[key] before anything is read."""
        self.check_shape(key, layer)
        return self._read(key, layer, rows)

    def check_shape(self, key: str, layer: int | None = None) -> tuple[int, ...]:
        shape = self._shape(key, layer)
        expected = self.config.weight_shapes().get(key)
        if expected is not None and tuple(shape) != expected:
            where = f"layer {layer} " if layer is not None else ""
            raise BadModelFileError(
                f"{self.describe(key, layer)}: {where}{key} has shape {list(shape)}, "
                f"expected {list(expected)} from the model config; the config and the weights disagree, "
                "use the config.json that came with these weights"
            )
        return tuple(shape)

    def check_shapes(self) -> None:
        """Every weight's header shape against the config before anything is built or read, so
        no dimension of a lying config sizes an allocation (the context is capped by ModelConfig)."""
        cfg = self.config
        for key in ("embed", "norm", "lm_head", "rope_freqs"):
            if key in ("embed", "norm") or self.has(key):
                self.check_shape(key)
        for layer in range(cfg.num_layers):
            for key in layer_weights(cfg):
                self.check_shape(key, layer)
            for key in ("q_bias", "k_bias", "v_bias", "o_bias", "gate_bias", "up_bias", "down_bias"):
                if self.has(key, layer):
                    self.check_shape(key, layer)

    def row_chunks(self, key: str, layer: int | None = None, rows_per_chunk: int = 4096):
        """Yield a big tensor (an embedding table) a few thousand rows at a time."""
        total = self._shape(key, layer)[0]
        for start in range(0, total, rows_per_chunk):
            yield self.get(key, layer, slice(start, min(total, start + rows_per_chunk)))

    def block_quant(self, key: str, layer: int | None = None):
        """The tensor's own block-quantized form (buildkit.schemes.BlockQuant) when the
        source stores it in one that maps exactly; None otherwise."""
        return None

    def describe(self, key: str, layer: int | None) -> str:
        return str(self.files[0])

    def source_tensor(self, key: str, layer: int | None = None) -> tuple[str, str]:
        """(the tensor's name in the checkpoint, its stored type: "BF16", "Q4_K" ...)."""
        raise NotImplementedError

    def hashes(self) -> dict[str, str]:
        return {p.name: sha256_file(p) for p in self.files}

    def close(self) -> None:
        pass


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def open_checkpoint(source: Path) -> Checkpoint:
    source = Path(source)
    if not source.exists():
        raise BadModelFileError(f"{source}: no such file or folder; give a Hugging Face model folder or a .gguf file")
    if source.is_dir():
        return HFCheckpoint(source)
    if source.suffix.lower() in PICKLE_SUFFIXES:
        raise UnsupportedModelError(_pickle_advice(source))
    return GGUFCheckpoint(source)


def _pickle_advice(path: Path) -> str:
    return (
        f"{path}: pickle checkpoints are refused and never opened (unpickling can run arbitrary code); "
        "convert the model to safetensors first, e.g. with transformers' save_pretrained(safe_serialization=True)"
    )


def hf_weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a Hugging Face folder (from its index if sharded); pickles refused."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "safetensors index").get("weight_map")
        if not isinstance(weight_map, dict):
            raise BadModelFileError(f"{index}: has no 'weight_map' object; re-download the index file")
        files = sorted({folder / str(v) for v in weight_map.values()})
        missing = [p.name for p in files if not p.is_file() or p.parent != folder]
        if missing:
            raise BadModelFileError(f"{index}: lists shard(s) not in the folder: {', '.join(missing)}; "
                                    "download every shard into the folder")
        return files
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return files
    pickles = [p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickles:
        raise UnsupportedModelError(_pickle_advice(pickles[0]))
    raise BadModelFileError(f"{folder}: no *.safetensors weights found; download the weights into the folder")


class HFCheckpoint(Checkpoint):
    def __init__(self, folder: Path):
        self.folder = folder
        cfg_path = folder / io.HF_CONFIG_NAME
        if not cfg_path.is_file():
            raise BadModelFileError(f"{cfg_path}: config.json is missing; a Hugging Face model folder needs one")
        raw = read_json_object(cfg_path, "config.json")
        self.raw_config = raw
        self.config = ModelConfig.from_hf(raw, str(cfg_path))
        self.files = hf_weight_files(folder)
        self.refs: dict[str, TensorRef] = {}
        for path in self.files:
            self.refs.update(read_safetensors_header(path))
        self._maps: dict[Path, mmap.mmap] = {}
        self.names = HF_NAMES[self.config.names]

    def _name(self, key: str, layer: int | None) -> str:
        return checkpoint_name(self.names, key, layer)

    def has(self, key: str, layer: int | None = None) -> bool:
        return key in self.names and self._name(key, layer) in self.refs

    def describe(self, key: str, layer: int | None) -> str:
        ref = self.refs.get(self._name(key, layer))
        return str(ref.path if ref else self.folder)

    def _ref(self, key: str, layer: int | None) -> TensorRef:
        name = self._name(key, layer)
        ref = self.refs.get(name)
        if ref is None:
            raise BadModelFileError(f"{self.folder}: tensor {name!r} is missing from the safetensors files; "
                                    "the download is incomplete or the config is wrong, re-download the model")
        if ref.dtype not in SAFETENSORS_FLOATS:
            raise BadModelFileError(f"{ref.path}: tensor {name!r} has dtype {ref.dtype}, not a float type; "
                                    "this checkpoint is not a plain float model, re-save it in F32, F16 or BF16")
        return ref

    def _shape(self, key: str, layer: int | None) -> tuple[int, ...]:
        return self._ref(key, layer).shape

    def source_tensor(self, key: str, layer: int | None = None) -> tuple[str, str]:
        return self._name(key, layer), self._ref(key, layer).dtype

    def _read(self, key: str, layer: int | None, rows: slice) -> np.ndarray:
        ref = self._ref(key, layer)
        if ref.path not in self._maps:
            with open(ref.path, "rb") as f:
                self._maps[ref.path] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm = self._maps[ref.path]
        arr = load_safetensor(ref, mm, rows)
        release_pages(mm, ref.start, ref.end)
        return arr

    def tokenizer(self) -> TokenizerFiles:
        return tokenizer_from_hf(self.folder)

    def close(self) -> None:
        self._maps.clear()  # arrays may still view the maps: let them close when unreferenced


class GGUFCheckpoint(Checkpoint):
    def __init__(self, path: Path):
        self.gguf = GGUFFile(path)
        self.files = [Path(path)]
        self.config = ModelConfig.from_gguf(self.gguf.metadata, set(self.gguf.tensors), str(path))
        self.names = GGUF_NAMES[self.config.names]
        self.permuted_qk = GGUF_PERMUTED_QK[self.config.names]

    @property
    def metadata(self) -> dict[str, Any]:
        return self.gguf.metadata

    def _name(self, key: str, layer: int | None) -> str | None:
        return checkpoint_name(self.names, key, layer) if key in self.names else None

    def has(self, key: str, layer: int | None = None) -> bool:
        return self._name(key, layer) in self.gguf.tensors

    def source_tensor(self, key: str, layer: int | None = None) -> tuple[str, str]:
        name = self._name(key, layer)
        return name, self.gguf.type_name(name)

    def _shape(self, key: str, layer: int | None) -> tuple[int, ...]:
        name = self._name(key, layer)
        if name not in self.gguf.tensors:
            raise BadModelFileError(f"{self.gguf.path}: tensor {name!r} is missing; the file is incomplete, "
                                    "re-download or re-convert it")
        return self.gguf.tensors[name].shape

    def _read(self, key: str, layer: int | None, rows: slice) -> np.ndarray:
        arr = dequantize_gguf(self.gguf, self._name(key, layer), rows)
        return unpermute_rotary_rows(arr, self._rotary_heads(key)) if self._permuted(key) else arr

    def _permuted(self, key: str) -> bool:
        return self.permuted_qk and key in ("q", "k")

    def _rotary_heads(self, key: str) -> int:
        """Heads whose rows llama.cpp interleaved: q has num_heads, k num_kv_heads."""
        return self.config.num_heads if key == "q" else self.config.num_kv_heads

    def block_quant(self, key: str, layer: int | None = None):
        from edgellama.buildkit.gguf_blocks import GGUF_NATIVE, from_gguf

        name = self._name(key, layer)
        shape = self.check_shape(key, layer)
        if self.gguf.type_name(name) not in GGUF_NATIVE or len(shape) != 2:
            return None
        bq = from_gguf(self.gguf.type_name(name), self.gguf.raw(name), shape)
        self.gguf.release(name)
        if self._permuted(key):
            bq = bq.rows(unpermute_rotary_rows(np.arange(shape[0]), self._rotary_heads(key)))
        return bq

    def tokenizer(self) -> TokenizerFiles:
        return tokenizer_from_gguf(self.gguf.metadata)

    def close(self) -> None:
        self.gguf.close()


def unpermute_rotary_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (interleaved rotary pairs -> rotate-half halves).

    w: (heads * head_dim, in). Within each head, llama.cpp stores rows as pairs
    (0, d/2), (1, d/2 + 1), ...; Hugging Face stores the two halves one after the other.
    """
    if w.shape[0] % (2 * heads):
        raise BadModelFileError(f"q/k weight rows {w.shape[0]} are not divisible by 2 * {heads} heads")
    half = w.shape[0] // heads // 2
    return w.reshape(heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
