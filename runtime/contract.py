"""The contract between the exporter, the quantizer and the runtime.

One home for the graph's I/O names, the KV-cache layout and the manifest schema.

Graph I/O (names shared with optimum and onnxruntime-genai):
  input_ids                      (batch, seq)                    int64
  attention_mask                 (batch, total_seq)              int64
  past_key_values.{i}.key/value  (batch, kv_heads, past_seq, head_dim)  float32|float16
  logits_to_keep (optional)      ()  default 0 = every position  int64
  logits                         (batch, seq or keep, vocab)     float32
  present.{i}.key/value          (batch, kv_heads, total_seq, head_dim)

When the manifest says ``kv_buffer: "shared"``, the graph's attention also accepts a
past buffer longer than the sequence so far (batch, kv_heads, max_seq, head_dim) with
``present`` bound to the same memory; the valid length is given by attention_mask.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadModelFileError

MANIFEST_NAME = "edgellama.json"
MANIFEST_VERSION = 1
# The longest context a model folder may claim. The exporter's rope tables and the runtime's
# KV buffers are sized from it, so a lying config or manifest must not make it terabytes;
# 2^20 covers every supported family (Qwen2.5-1M: 1,010,000).
MAX_CONTEXT = 1 << 20
GRAPH_NAME = "model.onnx"
GRAPH_DATA_NAME = "model.onnx.data"

INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# Optional scalar input with default 0 (all positions): logits for the last K positions only.
LOGITS_TO_KEEP = "logits_to_keep"


def past_key(layer: int) -> str:
    return f"past_key_values.{layer}.key"


def past_value(layer: int) -> str:
    return f"past_key_values.{layer}.value"


def present_key(layer: int) -> str:
    return f"present.{layer}.key"


def present_value(layer: int) -> str:
    return f"present.{layer}.value"


KV_DTYPES = {"fp32": "float32", "fp16": "float16"}


def read_json_object(path: Path, what: str = "file") -> dict[str, Any]:
    """The JSON object in `path`; BadModelFileError naming the file otherwise."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BadModelFileError(f"{path}: {what} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadModelFileError(f"{path}: {what} is not valid JSON ({exc}); re-export or fix the file") from None
    if not isinstance(value, dict):
        raise BadModelFileError(f"{path}: {what} is not a JSON object; re-export or fix the file")
    return value


@dataclass(frozen=True)
class Manifest:
    """What a model folder holds; written as edgellama.json beside model.onnx."""

    architecture: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    context_length: int
    dtype: str  # "fp32" | "fp16": activations and KV cache
    weights: str  # "fp32" | "fp16" | "int8" | "int4" ...
    attention: str  # "gqa" (com.microsoft GroupQueryAttention) | "standard"
    kv_buffer: str  # "shared": past/present may share one max-length buffer | "concat"
    bos_token_id: int | None
    eos_token_ids: list[int]
    add_bos_token: bool
    has_position_ids: bool = False
    quantization: dict[str, Any] | None = None
    via: str = "native"  # who built the graph: "native" (exporter/graph.py) | "optimum" (export --via optimum)
    graph_io: dict[str, Any] | None = None  # --via optimum: the traced graph's I/O, "{i}" standing for each layer
    source: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, Any] = field(default_factory=dict)
    # Set by `edgellama compile`: target, format, level, onnxruntime version, graph file ...;
    # runtime/artifact.py checks it before loading.
    compiled: dict[str, Any] | None = None
    manifest_version: int = MANIFEST_VERSION

    @property
    def kv_numpy_dtype(self) -> str:
        return KV_DTYPES[self.dtype]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def load(cls, folder: Path) -> "Manifest":
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise BadModelFileError(
                f"{path}: no {MANIFEST_NAME} here; is this a folder written by 'edgellama export'?"
            )
        raw = read_json_object(path, "manifest")
        version = raw.get("manifest_version")
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise BadModelFileError(f"{path}: manifest_version {version!r} is not a version number; re-export the model")
        if version > MANIFEST_VERSION:
            raise BadModelFileError(
                f"{path}: manifest version {version} is newer than this edgellama understands "
                f"(up to {MANIFEST_VERSION}); upgrade edgellama (pip install -U edgellama)"
            )
        known = set(cls.__dataclass_fields__)
        try:
            manifest = cls(**{k: v for k, v in raw.items() if k in known})
        except TypeError as exc:
            raise BadModelFileError(f"{path}: manifest is incomplete ({exc}); re-export the model") from None
        _check_fields(path, manifest)
        return manifest


_DIMENSIONS = ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim", "vocab_size", "context_length")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fields(path: Path, m: Manifest) -> None:
    """The runtime sizes buffers and makes choices from these: each must have the right type."""
    checks = [(name, _is_int(getattr(m, name)) and getattr(m, name) > 0, "a positive integer") for name in _DIMENSIONS]
    checks += [
        ("context_length", not _is_int(m.context_length) or m.context_length <= MAX_CONTEXT, f"at most {MAX_CONTEXT}"),
        ("dtype", isinstance(m.dtype, str) and m.dtype in KV_DTYPES, " or ".join(KV_DTYPES)),
        ("kv_buffer", m.kv_buffer in ("shared", "concat"), "shared or concat"),
        ("bos_token_id", m.bos_token_id is None or _is_int(m.bos_token_id), "a token id or null"),
        ("eos_token_ids", isinstance(m.eos_token_ids, list) and all(map(_is_int, m.eos_token_ids)), "a list of token ids"),
        ("add_bos_token", isinstance(m.add_bos_token, bool), "true or false"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise BadModelFileError(
                f"{path}: {name} is {getattr(m, name)!r}, expected {expected}; re-export the model"
            )
