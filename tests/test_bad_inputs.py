"""Bad inputs through the real CLI: exit code != 0, exactly one line on stderr saying what is
wrong and what to do, no traceback (unless --debug), nothing left at the output location (no
temporary folders either).

CASES is the table. docs/bad-inputs.md shows every case with the message it gets; regenerate it
with  EDGELLAMA_BAD_INPUTS_DOC=docs/bad-inputs.md pytest tests/test_bad_inputs.py
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

from conftest import make_tiny, small_gguf
from edgellama.cli import main

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "bad-inputs.md"
MESSAGES: dict[str, str] = {}  # case id -> the line the user saw (paths relative to the case folder)


@dataclass(frozen=True)
class Case:
    id: str
    what: str  # the bad input, as the doc describes it
    build: Callable[["Env"], list]  # makes the files; returns the CLI arguments
    needles: tuple[str, ...]  # the message must contain these
    prefix: str = "error: "
    slow: bool = False  # built from the real SmolLM2 GGUF


CASES: list[Case] = []


def case(case_id: str, what: str, *needles: str, prefix: str = "error: ", slow: bool = False):
    def register(build):
        CASES.append(Case(case_id, what, build, needles, prefix, slow))
        return build

    return register


@pytest.fixture(scope="module")
def tiny_sources(tmp_path_factory):
    """A tiny HF folder and its float export, made once; every case works on copies."""
    from edgellama.exporter.export import export

    base = tmp_path_factory.mktemp("tiny-sources")
    make_tiny(base / "hf")
    export(base / "hf", base / "model")
    return base


class Env:
    """One case's scratch folder: fresh copies of the inputs, the output path, monkeypatch."""

    def __init__(self, tmp: Path, sources: Path, request, monkeypatch):
        self.tmp, self.out, self.monkeypatch = tmp, tmp / "out", monkeypatch
        self._sources, self._request = sources, request

    def hf(self) -> Path:
        return self._copy("hf")

    def model(self) -> Path:
        return self._copy("model")

    def smollm2(self) -> Path:
        """The real SmolLM2 GGUF (read-only: copy before changing it)."""
        return self._request.getfixturevalue("smollm2_gguf")

    def _copy(self, name: str) -> Path:
        dst = self.tmp / name
        if not dst.exists():
            shutil.copytree(self._sources / name, dst)
        return dst


def edit_json(path: Path, change: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def read_safetensors(path: Path) -> tuple[dict, bytes]:
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n]), blob[8 + n:]


def write_safetensors(path: Path, header: dict, data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def export_args(env: Env, source: Path) -> list:
    return ["export", source, env.out]


# ---- Hugging Face folders ------------------------------------------------------------------

@case("config-missing", "HF folder without config.json", "config.json is missing", "needs one")
def _config_missing(env):
    (env.hf() / "config.json").unlink()
    return export_args(env, env.hf())


@case("config-empty", "config.json is an empty file", "config.json", "not valid JSON", "fix the file")
def _config_empty(env):
    (env.hf() / "config.json").write_text("")
    return export_args(env, env.hf())


@case("config-malformed", "config.json is cut off mid-object", "config.json", "not valid JSON")
def _config_malformed(env):
    (env.hf() / "config.json").write_text('{"hidden_size": 64,')
    return export_args(env, env.hf())


@case("config-not-object", "config.json holds a list", "config.json", "not a JSON object")
def _config_not_object(env):
    (env.hf() / "config.json").write_text("[1, 2, 3]")
    return export_args(env, env.hf())


@case("config-bad-value", "config.json: hidden_size is a string", "'hidden_size'", "must be a number")
def _config_bad_value(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(hidden_size="sixty-four"))
    return export_args(env, env.hf())


@case("config-missing-key", "config.json without num_hidden_layers", "'num_hidden_layers'", "missing")
def _config_missing_key(env):
    edit_json(env.hf() / "config.json", lambda c: c.pop("num_hidden_layers"))
    return export_args(env, env.hf())


@case("config-bad-rope", "config.json: rope_scaling factor is not a number", "rope", "factor")
def _config_bad_rope(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(rope_scaling={"rope_type": "linear", "factor": "x2"}))
    return export_args(env, env.hf())


@case("config-absurd-context", "config.json: max_position_embeddings 10^12 (would allocate terabytes)",
      "max_position_embeddings", "1048576")
def _config_absurd_context(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(max_position_embeddings=10**12))
    return export_args(env, env.hf())


@case("config-heads-mismatch", "config.json: attention heads not a multiple of KV heads", "num_key_value_heads")
def _config_heads(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(num_key_value_heads=3))
    return export_args(env, env.hf())


@case("unsupported-architecture", "config.json names GPTNeoXForCausalLM", "GPTNeoXForCausalLM",
      "LlamaForCausalLM", "supported")
def _unsupported_arch(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(architectures=["GPTNeoXForCausalLM"]))
    return export_args(env, env.hf())


@case("unsupported-rope", "config.json asks for yarn rope scaling", "yarn", "supported")
def _unsupported_rope(env):
    def to_v4_yarn(c):  # a transformers 4 config: rope_theta + rope_scaling, no rope_parameters
        c.update(rope_theta=c.pop("rope_parameters")["rope_theta"], rope_scaling={"rope_type": "yarn", "factor": 4.0})

    edit_json(env.hf() / "config.json", to_v4_yarn)
    return export_args(env, env.hf())


@case("tensor-missing", "a layer's up_proj weight is not in the safetensors", "model.layers.1.mlp.up_proj.weight",
      "missing")
def _tensor_missing(env):
    from safetensors.numpy import load_file, save_file

    path = env.hf() / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, str(path), metadata={"format": "pt"})
    return export_args(env, env.hf())


@case("tensor-wrong-shape", "config.json's intermediate_size disagrees with the weights", "shape", "expected")
def _tensor_shape(env):
    edit_json(env.hf() / "config.json", lambda c: c.update(intermediate_size=128))  # the weights have 96
    return export_args(env, env.hf())


@case("tensor-wrong-dtype", "q_proj stored as int32", "q_proj", "I32", "float")
def _tensor_dtype(env):
    import numpy as np
    from safetensors.numpy import load_file, save_file

    path = env.hf() / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.q_proj.weight"
    tensors[name] = tensors[name].astype(np.int32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return export_args(env, env.hf())


@case("safetensors-truncated", "model.safetensors cut in half", "model.safetensors", "truncated")
def _st_truncated(env):
    path = env.hf() / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return export_args(env, env.hf())


@case("safetensors-overlap", "safetensors header: two tensors share the same bytes", "overlap", "corrupt")
def _st_overlap(env):
    path = env.hf() / "model.safetensors"
    header, data = read_safetensors(path)
    a, b = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    write_safetensors(path, header, data)
    return export_args(env, env.hf())


@case("safetensors-past-end", "safetensors header: a tensor's offsets lie past the end of the file",
      "model.safetensors", "corrupt")
def _st_past_end(env):
    path = env.hf() / "model.safetensors"
    header, data = read_safetensors(path)
    entry = header["model.norm.weight"]
    start, end = entry["data_offsets"]
    entry["data_offsets"] = [start + len(data), end + len(data)]
    write_safetensors(path, header, data)
    return export_args(env, env.hf())


@case("safetensors-huge-header", "safetensors header length field says 2^63 bytes", "header claims", "corrupt")
def _st_huge_header(env):
    path = env.hf() / "model.safetensors"
    blob = path.read_bytes()
    path.write_bytes(struct.pack("<Q", 2**63) + blob[8:])
    return export_args(env, env.hf())


@case("safetensors-header-garbage", "safetensors header is not JSON", "not valid JSON", "re-download")
def _st_garbage(env):
    path = env.hf() / "model.safetensors"
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    path.write_bytes(blob[:8] + b"{" * n + blob[8 + n:])
    return export_args(env, env.hf())


@case("safetensors-is-a-folder", "model.safetensors is a folder, not a file", "model.safetensors",
      "Is a directory", "check the path")
def _st_folder(env):
    (env.hf() / "model.safetensors").unlink()
    (env.hf() / "model.safetensors").mkdir()
    return export_args(env, env.hf())


@case("shard-missing", "safetensors index lists a shard that is not there", "model-00002-of-00002.safetensors",
      "not in the folder")
def _shard_missing(env):
    header, _ = read_safetensors(env.hf() / "model.safetensors")
    weight_map = {name: "model.safetensors" for name in header if name != "__metadata__"}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    (env.hf() / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return export_args(env, env.hf())


@case("pickle-in-folder", "HF folder with pytorch_model.bin only", "pickle", "never", "safetensors")
def _pickle_folder(env):
    (env.hf() / "model.safetensors").unlink()
    (env.hf() / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return export_args(env, env.hf())


@case("pickle-file", "a .pt checkpoint given as the source", "pickle", "safetensors")
def _pickle_file(env):
    path = env.tmp / "model.pt"
    path.write_bytes(b"\x80\x04not really a pickle")
    return export_args(env, path)


@case("tokenizer-missing", "HF folder without tokenizer.json", "tokenizer.json", "missing", "save_pretrained")
def _tokenizer_missing(env):
    (env.hf() / "tokenizer.json").unlink()
    return export_args(env, env.hf())


@case("tokenizer-malformed", "HF folder with a tokenizer.json that is not a tokenizer", "tokenizer.json",
      "not a valid")
def _tokenizer_malformed(env):
    (env.hf() / "tokenizer.json").write_text('{"model": 5}')
    return export_args(env, env.hf())


@case("source-missing", "the source path does not exist", "no such file or folder", "give a")
def _source_missing(env):
    return export_args(env, env.tmp / "nowhere")


# ---- GGUF files ----------------------------------------------------------------------------

def _gguf(env: Env, blob: bytes) -> list:
    path = env.tmp / "model.gguf"
    path.write_bytes(blob)
    return export_args(env, path)


@case("gguf-truncated", "the real SmolLM2 GGUF cut at 40 MB", "model.gguf", "truncated", slow=True)
def _gguf_truncated(env):
    with open(env.smollm2(), "rb") as f:
        return _gguf(env, f.read(40_000_000))


@case("gguf-empty", "an empty .gguf file", "empty file", "re-download")
def _gguf_empty(env):
    return _gguf(env, b"")


@case("gguf-wrong-magic", "a .gguf whose magic is GGML", "not a GGUF file", "b'GGML'")
def _gguf_magic(env):
    return _gguf(env, small_gguf(magic=b"GGML"))


@case("gguf-unknown-version", "GGUF version 4", "GGUF version 4", "not supported")
def _gguf_version(env):
    return _gguf(env, small_gguf(version=4))


@case("gguf-absurd-tensor-count", "GGUF header claims 2^62 tensors", str(2**62), "corrupt")
def _gguf_count(env):
    return _gguf(env, b"GGUF" + struct.pack("<IQQ", 3, 2**62, 1) + b"\0" * 64)


@case("gguf-absurd-dims", "GGUF tensor claims dims 2^40 x 2^40", "'w'", "truncated")
def _gguf_dims(env):
    return _gguf(env, small_gguf(dims=(2**40, 2**40)))


@case("gguf-string-past-end", "GGUF metadata key length 2^40 (past the end of the file)", "past the end",
      "corrupt")
def _gguf_string(env):
    blob = bytearray(small_gguf())
    blob[24:32] = struct.pack("<Q", 2**40)  # the first key's length
    return _gguf(env, bytes(blob))


@case("gguf-unsupported-architecture", "GGUF general.architecture = gpt2", "'gpt2'", "supported")
def _gguf_arch(env):
    return _gguf(env, small_gguf(arch="gpt2"))


@case("gguf-unsupported-quant", "SmolLM2 GGUF with one tensor's type changed to IQ4_NL", "IQ4_NL",
      "not supported", slow=True)
def _gguf_quant(env):
    blob = bytearray(env.smollm2().read_bytes())
    name = b"blk.0.attn_q.weight"
    at = blob.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)  # then rank, dims, type
    (rank,) = struct.unpack_from("<I", blob, at)
    type_at = at + 4 + 8 * rank
    assert struct.unpack_from("<I", blob, type_at)[0] == 3  # Q4_1
    struct.pack_into("<I", blob, type_at, 20)  # IQ4_NL: 18 bytes a block, fits where Q4_1's 20 did
    return _gguf(env, bytes(blob))


# ---- model folders: run, quantize ----------------------------------------------------------

def _point_weights_outside(folder: Path, location: str) -> None:
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL:
            for entry in t.external_data:
                if entry.key == "location":
                    entry.value = location
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "model.onnx.data").rename(folder.parent / "outside.data")


@case("external-data-outside-run", "run: model.onnx's weights point to ../outside.data", "outside the model folder",
      "'../outside.data'", "refus")
def _outside_run(env):
    _point_weights_outside(env.model(), "../outside.data")
    return ["run", env.model(), "--prompt", "the quick"]


@case("external-data-absolute-run", "run: model.onnx's weights point to an absolute path",
      "outside the model folder", "refus")
def _absolute_run(env):
    _point_weights_outside(env.model(), str(env.tmp / "outside.data"))
    return ["run", env.model(), "--prompt", "the quick"]


@case("external-data-symlink-run", "run: model.onnx.data is a symlink to a file outside the folder",
      "outside the model folder", "refus")
def _symlink_run(env):
    data = env.model() / "model.onnx.data"
    data.rename(env.tmp / "outside.data")
    data.symlink_to(env.tmp / "outside.data")
    return ["run", env.model(), "--prompt", "the quick"]


@case("external-data-outside-quantize", "quantize: model.onnx's weights point to ../outside.data",
      "outside the model folder", "refus")
def _outside_quantize(env):
    _point_weights_outside(env.model(), "../outside.data")
    return ["quantize", env.model(), env.out]


@case("link-outside-quantize", "quantize: the folder's chat_template.jinja links to a file outside it",
      "outside the model folder", "refusing to copy")
def _link_outside_quantize(env):
    model = env.model()
    secret = env.tmp / "secret.txt"
    secret.write_text("not a tokenizer")
    (model / "chat_template.jinja").unlink(missing_ok=True)
    (model / "chat_template.jinja").symlink_to(secret)
    return ["quantize", model, env.out, "--no-calibration"]


@case("manifest-newer", "edgellama.json written by a newer manifest version", "manifest version 99",
      "upgrade edgellama")
def _manifest_newer(env):
    edit_json(env.model() / "edgellama.json", lambda m: m.update(manifest_version=99))
    return ["run", env.model(), "--prompt", "the quick"]


@case("manifest-newer-quantize", "quantize a folder with a newer manifest version", "manifest version 99",
      "upgrade edgellama")
def _manifest_newer_quantize(env):
    edit_json(env.model() / "edgellama.json", lambda m: m.update(manifest_version=99))
    return ["quantize", env.model(), env.out]


@case("manifest-malformed", "edgellama.json is not JSON", "edgellama.json", "not valid JSON")
def _manifest_malformed(env):
    (env.model() / "edgellama.json").write_text("{")
    return ["run", env.model(), "--prompt", "the quick"]


@case("not-a-model-folder", "run on a folder that holds no model", "edgellama.json", "edgellama export")
def _not_model(env):
    (env.tmp / "empty").mkdir()
    return ["run", env.tmp / "empty", "--prompt", "the quick"]


@case("model-tokenizer-missing", "model folder without tokenizer.json", "tokenizer.json", "missing",
      "re-export")
def _model_tokenizer_missing(env):
    (env.model() / "tokenizer.json").unlink()
    return ["run", env.model(), "--prompt", "the quick"]


@case("model-tokenizer-malformed", "model folder whose tokenizer.json is truncated", "tokenizer.json",
      "malformed", "re-export")
def _model_tokenizer_malformed(env):
    path = env.model() / "tokenizer.json"
    path.write_text(path.read_text()[:100])
    return ["run", env.model(), "--prompt", "the quick"]


@case("graph-garbage", "model.onnx is not an ONNX file", "model.onnx", "not a valid ONNX file", "re-export")
def _graph_garbage(env):
    (env.model() / "model.onnx").write_bytes(b"\x00garbage" * 100)
    return ["run", env.model(), "--prompt", "the quick"]


@case("weights-truncated", "model.onnx.data cut short", "model.onnx.data", "truncated", "re-export")
def _weights_truncated(env):
    path = env.model() / "model.onnx.data"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 3])
    return ["run", env.model(), "--prompt", "the quick"]


@case("already-quantized", "quantize a folder that is already int4", "already quantized", "float export")
def _already_quantized(env):
    edit_json(env.model() / "edgellama.json", lambda m: m.update(weights="int4", quantization={"bits": 4}))
    return ["quantize", env.model(), env.out]


@case("size-budget-too-small", "quantize --size-budget below what the options can write", "--size-budget",
      "below the smallest folder", "raise it")
def _size_budget_too_small(env):
    return ["quantize", env.model(), env.out, "--size-budget", "0.01", "--calibration-tokens", "64"]


@case("size-budget-not-4-bits", "quantize --bits 8 --size-budget", "--size-budget", "needs --bits 4")
def _size_budget_bits(env):
    return ["quantize", env.model(), env.out, "--bits", "8", "--size-budget", "5"]


@case("arm64-level-all", "compile --target arm64 --level all", "--target arm64", "--level all")
def _arm64_level_all(env):
    return ["compile", env.model(), env.out, "--target", "arm64", "--level", "all"]


@case("chat-template-not-utf8", "model folder whose chat_template.jinja is Latin-1 text", "chat_template.jinja",
      "not UTF-8", "save it as UTF-8")
def _template_not_utf8(env):
    (env.model() / "chat_template.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    return ["run", env.model(), "--prompt", "the quick", "--chat"]


@case("chat-template-wrong-type", "tokenizer_config.json's chat_template is a number", "tokenizer_config.json",
      "chat_template is a int", "fix the file")
def _template_wrong_type(env):
    (env.model() / "chat_template.jinja").unlink()
    edit_json(env.model() / "tokenizer_config.json", lambda c: c.update(chat_template=42))
    return ["run", env.model(), "--prompt", "the quick", "--chat"]


@case("chat-template-hostile", "run --chat with a template that reaches for `__class__`", "chat template", "unsafe")
def _template_hostile(env):
    (env.model() / "chat_template.jinja").write_text("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    return ["run", env.model(), "--prompt", "the quick", "--chat"]


@case("chat-template-endless", "run --chat with a template that loops 10^12 times", "chat template", "limit")
def _template_endless(env):
    (env.model() / "chat_template.jinja").write_text("{% for i in range(10**12) %}x{% endfor %}")
    return ["run", env.model(), "--prompt", "the quick", "--chat"]


# ---- prompts and options -------------------------------------------------------------------

@case("prompt-too-long", "a prompt longer than the model's context (128 tokens)", "prompt is", "context is 128",
      "shorten")
def _prompt_long(env):
    return ["run", env.model(), "--prompt", "the quick brown fox " * 100]


@case("prompt-empty", "an empty prompt", "prompt is empty")
def _prompt_empty(env):
    return ["run", env.model(), "--prompt", ""]


def _option_case(case_id: str, option: str, value: str, *needles: str) -> None:
    @case(case_id, f"run {option} {value}", *needles)
    def build(env):
        return ["run", env.model(), "--prompt", "the quick", option, value]


_option_case("temperature-negative", "--temperature", "-1", "--temperature", "not in the range x>=0")
_option_case("temperature-nan", "--temperature", "nan", "temperature", "finite")
_option_case("top-p-zero", "--top-p", "0", "--top-p", "not in the range 0<x<=1")
_option_case("top-p-above-one", "--top-p", "1.5", "--top-p", "not in the range 0<x<=1")
_option_case("top-k-negative", "--top-k", "-1", "--top-k", "not in the range x>=0")
_option_case("min-p-one", "--min-p", "1", "--min-p", "not in the range 0<=x<1")
_option_case("repetition-penalty-zero", "--repetition-penalty", "0", "--repetition-penalty", "not in the range 0.0001<=x<=10000")
_option_case("max-new-tokens-zero", "--max-new-tokens", "0", "--max-new-tokens", "not in the range x>=1")
_option_case("seed-negative", "--seed", "-3", "--seed", "not in the range x>=0")
_option_case("threads-zero", "--threads", "0", "--threads", "not in the range x>=1")


@case("provider-unavailable", "run --provider cuda where onnxruntime has no CUDA", "'cuda'", "not available")
def _provider(env):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    return ["run", env.model(), "--prompt", "the quick", "--provider", "cuda"]


# ---- the output location -------------------------------------------------------------------

@case("output-exists", "export to an existing folder without --force", "already exists", "--force")
def _output_exists(env):
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return export_args(env, env.hf())


@case("output-exists-quantize", "quantize to an existing folder without --force", "already exists", "--force")
def _output_exists_quantize(env):
    env.out.mkdir()
    (env.out / "keep.txt").write_text("mine")
    return ["quantize", env.model(), env.out]


@case("output-is-a-file", "export --force onto an existing file", "not a folder", "choose another")
def _output_file(env):
    env.out.write_text("mine")
    return [*export_args(env, env.hf()), "--force"]


@case("output-is-source", "export --force with the source folder as the output", "would replace the input",
      "choose another")
def _output_is_source(env):
    env.out = env.hf()
    return [*export_args(env, env.hf()), "--force"]


@case("output-contains-source", "quantize --force into a folder that holds the input", "would replace the input",
      "choose another")
def _output_holds_source(env):
    env.out = env.tmp
    return ["quantize", env.model(), env.tmp, "--force"]


@case("output-parent-missing", "export into a folder whose parent does not exist", "does not exist", "create it")
def _output_parent(env):
    env.out = env.tmp / "no" / "such" / "out"
    return export_args(env, env.hf())


@case("output-not-writable", "export into a folder the user cannot write", "cannot write", "writable")
def _output_not_writable(env):
    if os.geteuid() == 0:  # root writes anywhere a permission bit forbids; /sys refuses even root
        if not Path("/sys/kernel").is_dir():
            pytest.skip("no /sys to stand for an unwritable folder")
        env.out = Path("/sys/kernel/edgellama-out")
    else:
        parent = env.tmp / "read-only"
        parent.mkdir(mode=0o555)
        env.out = parent / "out"
    return export_args(env, env.hf())


def _fail_third_weight(env: Env, exc: BaseException) -> None:
    from edgellama.buildkit.graph_writer import GraphWriter

    real, calls = GraphWriter.weight_chunks, []

    def weight_chunks(self, name, chunks):
        calls.append(name)
        if len(calls) == 3:
            raise exc
        return real(self, name, chunks)

    env.monkeypatch.setattr(GraphWriter, "weight_chunks", weight_chunks)


@case("disk-full-export", "the disk fills up while export writes weights (ENOSPC)", "disk is full",
      "free some space")
def _disk_full_export(env):
    _fail_third_weight(env, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return export_args(env, env.hf())


@case("disk-full-quantize", "the disk fills up while quantize writes weights (ENOSPC)", "disk is full",
      "free some space")
def _disk_full_quantize(env):
    _fail_third_weight(env, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    return ["quantize", env.model(), env.out]


@case("ctrl-c-export", "Ctrl-C while export writes the graph", "interrupted", "nothing was left",
      prefix="interrupted")
def _ctrl_c_export(env):
    _fail_third_weight(env, KeyboardInterrupt())
    return export_args(env, env.hf())


@case("ctrl-c-at-mkdir", "Ctrl-C the instant the temporary output folder exists", "interrupted",
      "nothing was left", prefix="interrupted")
def _ctrl_c_at_mkdir(env):
    real = Path.mkdir

    def mkdir(self, *args, **kwargs):
        real(self, *args, **kwargs)
        if self.name.endswith(".partial"):
            raise KeyboardInterrupt

    env.monkeypatch.setattr(Path, "mkdir", mkdir)
    return export_args(env, env.hf())


@case("ctrl-c-quantize", "Ctrl-C while quantize rewrites weights", "interrupted", "nothing was left",
      prefix="interrupted")
def _ctrl_c_quantize(env):
    from edgellama.quantize import rewrite

    real, calls = rewrite.quantize, []

    def quantize(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    env.monkeypatch.setattr(rewrite, "quantize", quantize)
    return ["quantize", env.model(), env.out]


# ---- the checks ----------------------------------------------------------------------------

def assert_one_clean_line(exit_code: int, stdout: str, stderr: str, prefix: str = "error: ") -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_code != 0
    assert len(lines) == 1, stderr
    assert lines[0].startswith(prefix), lines[0]
    assert "; " in lines[0], f"says what is wrong but not what to do: {lines[0]}"
    assert "Traceback" not in stderr + stdout
    assert not stdout.strip(), stdout
    return lines[0]


def _snapshot(path: Path) -> list | None:
    """What is at `path` (and beside it): names and sizes, to compare before and after."""
    if not path.parent.is_dir():
        return None
    beside = sorted(p.name for p in path.parent.iterdir())
    inside = sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*") if p.is_file()) \
        if path.is_dir() else path.is_file()
    return [beside, inside]


@pytest.mark.parametrize("bad", [pytest.param(c, id=c.id, marks=pytest.mark.slow if c.slow else ()) for c in CASES])
def test_bad_input(bad: Case, tiny_sources, tmp_path, request, monkeypatch):
    env = Env(tmp_path, tiny_sources, request, monkeypatch)
    args = [str(a) for a in bad.build(env)]
    before = _snapshot(env.out)
    result = CliRunner().invoke(main, args)
    if not isinstance(result.exception, SystemExit):
        pytest.fail("".join(traceback.format_exception(*result.exc_info)))
    line = assert_one_clean_line(result.exit_code, result.stdout, result.stderr, bad.prefix)
    for needle in bad.needles:
        assert needle in line, f"{needle!r} not in: {line}"
    assert _snapshot(env.out) == before  # nothing written, nothing removed, no temporary folder beside it
    MESSAGES[bad.id] = line.replace(f"'{tmp_path}/", "'/tmp/.../").replace(f"{tmp_path}/", "").replace(str(tmp_path), ".")


def test_existing_output_kept_then_replaced_with_force(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    runner = CliRunner()
    assert runner.invoke(main, ["export", str(folder), str(out)]).exit_code != 0
    assert (out / "keep.txt").read_text() == "mine"
    assert runner.invoke(main, ["export", str(folder), str(out), "--force"]).exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


# ---- real processes: --debug, a real SIGINT, a real write failure --------------------------

def _cli(*args, **kwargs) -> subprocess.Popen:
    # faulthandler: a process that hangs is sent SIGABRT by _finish and prints every thread's stack
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "PYTHONFAULTHANDLER": "1"}
    return subprocess.Popen([sys.executable, "-m", "edgellama.cli", *map(str, args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_debug_shows_the_traceback(tmp_path):
    quiet = _cli("export", tmp_path / "nowhere", tmp_path / "out")
    out, err = quiet.communicate(timeout=120)
    assert_one_clean_line(quiet.returncode, out, err)
    loud = _cli("--debug", "export", tmp_path / "nowhere", tmp_path / "out")
    out, err = loud.communicate(timeout=120)
    assert loud.returncode != 0
    assert "Traceback" in err and "BadArgumentError" in err and "no such file or folder" in err


def _interrupt_when_writing(proc: subprocess.Popen, out: Path) -> None:
    """SIGINT as soon as the temporary output folder appears."""
    deadline = time.monotonic() + 300
    while not any(p.name.startswith(f".{out.name}.") for p in out.parent.iterdir()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[str, str]:
    """stdout, stderr once the process exits; a process still running after `timeout` is
    aborted and the test fails with the Python stacks it was in."""
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate(timeout=60)
        pytest.fail(f"the process had not exited {timeout:.0f} s after SIGINT; its threads:\n{err[-6000:]}")


@pytest.mark.slow
def test_ctrl_c_during_export_real_signal(smollm2_gguf, tmp_path):
    out = tmp_path / "out"
    proc = _cli("export", smollm2_gguf, out, "--bits", "4")
    _interrupt_when_writing(proc, out)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130
    line = assert_one_clean_line(proc.returncode, stdout, stderr, prefix="interrupted")
    MESSAGES["ctrl-c-export-signal"] = line
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.slow
def test_ctrl_c_during_quantize_real_signal(smollm2_onnx, tmp_path):
    out = tmp_path / "out"
    proc = _cli("quantize", smollm2_onnx, out)
    _interrupt_when_writing(proc, out)
    stdout, stderr = _finish(proc)
    assert proc.returncode == 130
    MESSAGES["ctrl-c-quantize-signal"] = assert_one_clean_line(proc.returncode, stdout, stderr, prefix="interrupted")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_write_failure_real_file_size_limit(tiny_sources, tmp_path):
    """A real failing write: RLIMIT_FSIZE makes the data file hit EFBIG part way, as a full disk
    would (Python ignores SIGXFSZ, so the write returns the error)."""
    import resource

    out = tmp_path / "out"
    limit = 150_000  # the tiny model's weights take more (64 KiB-aligned tensors)

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = _cli("export", tiny_sources / "hf", out, preexec_fn=cap)
    stdout, stderr = proc.communicate(timeout=300)
    line = assert_one_clean_line(proc.returncode, stdout, stderr)
    assert "file-size limit" in line
    MESSAGES["write-fails-file-size-limit"] = line.replace(f"{tmp_path}/", "")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


# ---- the table in docs/bad-inputs.md -------------------------------------------------------

EXTRA = {  # cases checked by the real-process tests above
    "ctrl-c-export-signal": "a real SIGINT while `export --bits 4` streams SmolLM2",
    "ctrl-c-quantize-signal": "a real SIGINT while `quantize` rewrites SmolLM2",
    "write-fails-file-size-limit": "a real failing write (RLIMIT_FSIZE, as a full disk) during export",
}


def test_doc_lists_every_case():
    text = DOC.read_text(encoding="utf-8")
    missing = [c.id for c in CASES if f"`{c.id}`" not in text] + [k for k in EXTRA if f"`{k}`" not in text]
    assert not missing, f"{DOC} lacks {missing}; regenerate it (see this module's docstring)"


@pytest.fixture(scope="module", autouse=True)
def _write_doc():
    yield
    target = os.environ.get("EDGELLAMA_BAD_INPUTS_DOC")
    if not target:
        return
    rows = [(c.id, c.what) for c in CASES] + list(EXTRA.items())
    lines = [
        "# Bad inputs and what the user sees",
        "",
        "Generated by `EDGELLAMA_BAD_INPUTS_DOC=docs/bad-inputs.md pytest tests/test_bad_inputs.py`;",
        "every row is a test that runs the CLI and checks: exit code != 0, exactly this one line on",
        "stderr, no traceback (`edgellama --debug ...` shows one), nothing left at the output location.",
        "Paths are relative to the test's scratch folder.",
        "",
        "| case | bad input | message |",
        "|---|---|---|",
    ]
    for case_id, what in rows:
        message = MESSAGES.get(case_id, "(not run)").replace("|", "\\|")
        lines.append(f"| `{case_id}` | {what} | `{message}` |")
    Path(target).write_text("\n".join(lines) + "\n", encoding="utf-8")
