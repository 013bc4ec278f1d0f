"""The folder contract: what a model folder holds and what its graph's I/O is called.

Every package reads it from here: the exporter and quantizer write folders to it, the
runtime reads them, deploy compiles and packs them. Folders written by other tools
(onnxruntime-genai, optimum) are read through runtime/adapters.py into the same Manifest.

Files of a model folder:
  edgellama.json          the Manifest (below), versioned
  model.onnx (+ .data)    the decoder graph and its weights (model.ort once compiled to ORT format)
  tokenizer.json, tokenizer_config.json, chat_template.jinja (when the model has one)
  genai_config.json       so onnxruntime-genai loads the same folder (runtime/adapters.py)

Graph I/O (names shared with optimum and onnxruntime-genai):
  input_ids                      (batch, seq)                    int64
  attention_mask                 (batch, total_seq)              int64
  position_ids (optional)        (batch, seq)                    int64
  past_key_values.{i}.key/value  (batch, kv_heads, past_seq, head_dim)  float32|float16
  num_logits_to_keep             (1,) 0 = every position, K = the last K   int64
  logits                         (batch, seq or keep, vocab)     float32
  present.{i}.key/value          (batch, kv_heads, total_seq, head_dim)

KV layouts (KVLayout): with SHARED, the graph's attention also accepts a past buffer
longer than the sequence so far (batch, kv_heads, max_seq, head_dim) with ``present``
bound to the same memory; the valid length is given by attention_mask. CONCAT graphs
return a new present of exactly total_seq positions each run.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from .errors import BadModelFileError

MANIFEST_NAME = "edgellama.json"
MANIFEST_VERSION = 1
# The longest context a model folder may claim. The exporter's rope tables and the runtime's
# KV buffers are sized from it, so a lying config or manifest must not make it terabytes;
# 2^20 covers every supported family (Qwen2.5-1M: 1,010,000).
MAX_CONTEXT = 1 << 20

# ---- file names --------------------------------------------------------------------------
GRAPH_NAME = "model.onnx"
GRAPH_DATA_NAME = "model.onnx.data"
ORT_GRAPH_NAME = "model.ort"  # `edgellama compile --format ort`
REQUIRED_OPERATORS_NAME = "required_operators.config"  # beside model.ort, for minimal builds
TOKENIZER_NAME = "tokenizer.json"
TOKENIZER_CONFIG_NAME = "tokenizer_config.json"
CHAT_TEMPLATE_NAME = "chat_template.jinja"
CHAT_TEMPLATE_JSON_NAME = "chat_template.json"  # transformers' processor form: {"chat_template": ...}
GENAI_CONFIG_NAME = "genai_config.json"
HF_CONFIG_NAME = "config.json"  # a Hugging Face model's config (optimum folders, export sources)
GENERATION_CONFIG_NAME = "generation_config.json"

# ---- graph I/O names ---------------------------------------------------------------------
INPUT_IDS = "input_ids"
ATTENTION_MASK = "attention_mask"
POSITION_IDS = "position_ids"
LOGITS = "logits"
# (1,) int64: logits for the last K positions only, 0 = every position. The name and shape
# onnxruntime-genai knows: it feeds 0 to a graph that declares it. A plain input, not an
# initializer with a default (ORT warns about those on every load), so every caller feeds it.
LOGITS_TO_KEEP = "num_logits_to_keep"
# Folders exported before: a scalar "logits_to_keep" with an initializer default of 0.
LEGACY_LOGITS_TO_KEEP = "logits_to_keep"
PAST_KEY = "past_key_values.%d.key"
PAST_VALUE = "past_key_values.%d.value"
PRESENT_KEY = "present.%d.key"
PRESENT_VALUE = "present.%d.value"


def past_key(layer: int) -> str:
    return PAST_KEY % layer


def past_value(layer: int) -> str:
    return PAST_VALUE % layer


def present_key(layer: int) -> str:
    return PRESENT_KEY % layer


def present_value(layer: int) -> str:
    return PRESENT_VALUE % layer


def kv_names(layers: int):
    """(past, present) name pairs, key then value, layer by layer."""
    for i in range(layers):
        yield past_key(i), present_key(i)
        yield past_value(i), present_value(i)


class KVLayout(str, Enum):
    """How past and present KV tensors relate; the manifest's ``kv_buffer``."""

    SHARED = "shared"  # one max-length buffer per layer, appended in place (GroupQueryAttention)
    CONCAT = "concat"  # a new present per run, the past plus the new positions (any graph)


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
    kv_buffer: str  # a KVLayout value: "shared" | "concat"
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

    @property
    def kv_layout(self) -> KVLayout:
        return KVLayout(self.kv_buffer)

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
        ("kv_buffer", m.kv_buffer in {k.value for k in KVLayout}, " or ".join(k.value for k in KVLayout)),
        ("bos_token_id", m.bos_token_id is None or _is_int(m.bos_token_id), "a token id or null"),
        ("eos_token_ids", isinstance(m.eos_token_ids, list) and all(map(_is_int, m.eos_token_ids)), "a list of token ids"),
        ("add_bos_token", isinstance(m.add_bos_token, bool), "true or false"),
    ]
    for name, ok, expected in checks:
        if not ok:
            raise BadModelFileError(
                f"{path}: {name} is {getattr(m, name)!r}, expected {expected}; re-export the model"
            )


# ---- chat template -----------------------------------------------------------------------

def find_chat_template(folder: Path) -> str | None:
    """The chat template source of a model folder or a Hugging Face folder, as transformers
    finds it: chat_template.jinja, then chat_template.json, then tokenizer_config.json's
    ``chat_template`` (a string, or a list of named templates of which "default" is used).
    None where there is none; BadModelFileError naming the file where one is unreadable."""
    folder = Path(folder)
    path = folder / CHAT_TEMPLATE_NAME
    if path.is_file():
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BadModelFileError(f"{path}: the chat template is not UTF-8 text ({exc.reason} at byte "
                                    f"{exc.start}); save it as UTF-8 or remove it") from None
    for path in (folder / CHAT_TEMPLATE_JSON_NAME, folder / TOKENIZER_CONFIG_NAME):
        if path.is_file():
            template = _template_entry(read_json_object(path, path.name).get("chat_template"), path)
            if template is not None:
                return template
    return None


def _template_entry(value: Any, path: Path) -> str | None:
    if value is None or isinstance(value, str):
        return value or None
    if isinstance(value, list):  # several named templates: [{"name": ..., "template": ...}]
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        value = named.get("default")
        if value is None or isinstance(value, str):
            return value or None
    raise BadModelFileError(f"{path}: chat_template is a {type(value).__name__}, expected text or a list of "
                            "named templates; fix the file or remove the entry")
