"""Model dimensions, derived once from a Hugging Face config.json or GGUF metadata.

`ModelConfig` is the single source of shape truth for the exporter: every
tensor shape the graph expects and every attribute the graph writes comes from it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from edgellama.runtime.contract import MAX_CONTEXT
from edgellama.runtime.errors import BadModelFileError, UnsupportedModelError

# HF architecture name -> family traits the graph needs to know about.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
}
ROPE_TYPES = ("default", "linear", "llama3")
# Appended to the errors of what only the native builder lacks (exporter/via_optimum.py covers more).
VIA_OPTIMUM_HINT = "; try 'edgellama export --via optimum' (needs optimum-onnx: pip install 'optimum-onnx>=0.1')"


_FIX = "fix the config or re-download the model"


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    type: str = "default"  # one of ROPE_TYPES
    factor: float = 1.0
    low_freq_factor: float = 1.0  # llama3 only
    high_freq_factor: float = 4.0  # llama3 only
    original_context: int = 8192  # llama3 only

    def inv_freq(self, rotary_dim: int) -> np.ndarray:
        """(rotary_dim/2,) float64 inverse frequencies after scaling."""
        base = 1.0 / (self.theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim))
        if self.type == "linear":
            return base / self.factor
        if self.type == "llama3":
            return _llama3_scale(base, self)
        return base


def _llama3_scale(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    # Same piecewise rule as transformers' _compute_llama3_parameters.
    low_wavelen = rope.original_context / rope.low_freq_factor
    high_wavelen = rope.original_context / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_context / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled)


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # HF class name, e.g. "LlamaForCausalLM"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    context_length: int
    rope: RopeConfig = field(default_factory=RopeConfig)
    tie_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2; Llama with attention_bias
    o_bias: bool = False  # Llama with attention_bias
    mlp_bias: bool = False
    sliding_window: int | None = None  # Mistral: attend to at most this many keys

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers",
                     "num_heads", "num_kv_heads", "head_dim", "context_length"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise BadModelFileError(f"model config: {name} must be a positive integer, got {value!r}; {_FIX}")
        if self.context_length > MAX_CONTEXT:
            raise UnsupportedModelError(
                f"model config: max_position_embeddings / context_length {self.context_length} is more than "
                f"{MAX_CONTEXT} (the largest this tool supports); fix the config if the value is a mistake"
            )
        if self.num_heads % self.num_kv_heads:
            raise BadModelFileError(
                f"model config: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads}); {_FIX}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise BadModelFileError(f"model config: sliding_window must be positive, got {self.sliding_window}; {_FIX}")
        if self.head_dim % 2:
            raise UnsupportedModelError(f"model config: head_dim {self.head_dim} is odd; rotary embeddings need it even")

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """Expected shape of each logical weight, in checkpoint layout (out, in)."""
        H, I = self.hidden_size, self.intermediate_size
        return {
            "embed": (self.vocab_size, H),
            "rope_freqs": (self.head_dim // 2,),  # GGUF (Llama 3.1): divisors of the rotary frequencies
            "lm_head": (self.vocab_size, H),
            "norm": (H,),
            "attn_norm": (H,),
            "mlp_norm": (H,),
            "q": (self.q_size, H),
            "k": (self.kv_size, H),
            "v": (self.kv_size, H),
            "o": (H, self.q_size),
            "q_bias": (self.q_size,),
            "k_bias": (self.kv_size,),
            "v_bias": (self.kv_size,),
            "o_bias": (H,),
            "gate": (I, H),
            "up": (I, H),
            "down": (H, I),
            "gate_bias": (I,),
            "up_bias": (I,),
            "down_bias": (H,),
        }

    # ---- readers -------------------------------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: Mapping[str, Any], where: str = "config.json") -> "ModelConfig":
        archs = cfg.get("architectures") or []
        arch = archs[0] if isinstance(archs, list) and archs else None
        if not isinstance(arch, str) or arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{where}: architecture {arch!r} is not supported by the native exporter; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}{VIA_OPTIMUM_HINT}"
            )
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"{where}: hidden_act {cfg.get('hidden_act')!r}; the native exporter "
                                        f"supports only 'silu'{VIA_OPTIMUM_HINT}")
        get = _getter(cfg, where)
        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        family = SUPPORTED_ARCHITECTURES[arch]
        attention_bias = bool(cfg.get("attention_bias", False))
        window = get("sliding_window", int, default=None) if family == "mistral" else None
        if family == "qwen2" and cfg.get("use_sliding_window"):
            raise UnsupportedModelError(f"{where}: Qwen2 with use_sliding_window=true is not supported{VIA_OPTIMUM_HINT}")
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=get("num_hidden_layers", int),
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", int, default=heads),
            head_dim=get("head_dim", int, default=hidden // heads if heads else 0),
            rms_eps=get("rms_norm_eps", float, default=1e-6),
            context_length=get("max_position_embeddings", int, default=2048),
            rope=_rope_from_hf(cfg, where),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias,
            o_bias=family == "llama" and attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window or None,
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str], where: str) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if arch != "llama":
            raise UnsupportedModelError(
                f"{where}: GGUF architecture {arch!r} is not supported; supported: 'llama' "
                "(Llama 2/3, Mistral, SmolLM, TinyLlama, CodeLlama)"
            )
        get = _getter(meta, where)
        hidden, heads = get("llama.embedding_length", int), get("llama.attention.head_count", int)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get("llama.vocab_size", int, default=len(tokens) if isinstance(tokens, list) else 0)
        return cls(
            architecture="LlamaForCausalLM",
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get("llama.feed_forward_length", int),
            num_layers=get("llama.block_count", int),
            num_heads=heads,
            num_kv_heads=get("llama.attention.head_count_kv", int, default=heads),
            head_dim=get("llama.attention.key_length", int, default=hidden // heads if heads else 0),
            rms_eps=get("llama.attention.layer_norm_rms_epsilon", float, default=1e-5),
            context_length=get("llama.context_length", int, default=2048),
            rope=_rope_from_gguf(meta, get),
            tie_embeddings="output.weight" not in tensor_names,
        )


def _getter(cfg: Mapping[str, Any], where: str):
    missing = object()

    def get(key: str, kind: type, default: Any = missing) -> Any:
        value = cfg.get(key, missing)
        if value is missing or value is None:
            if default is missing:
                raise BadModelFileError(f"{where}: required key {key!r} is missing; {_FIX}")
            return default
        if kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
            raise BadModelFileError(f"{where}: {key!r} must be a number, got {value!r}; {_FIX}")
        return kind(value)

    return get


def _rope_from_hf(cfg: Mapping[str, Any], where: str) -> RopeConfig:
    # transformers >= 5 writes "rope_parameters" (theta inside); older configs write
    # "rope_theta" plus an optional "rope_scaling".
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise BadModelFileError(f"{where}: rope_parameters / rope_scaling must be objects; {_FIX}")
    params = {**scaling, **params}
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope scaling type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            f"{VIA_OPTIMUM_HINT}"
        )
    get = _getter({"rope_theta": cfg.get("rope_theta"), **params}, where)
    return RopeConfig(
        theta=get("rope_theta", float, default=10000.0),
        type=rtype,
        factor=get("factor", float, default=1.0),
        low_freq_factor=get("low_freq_factor", float, default=1.0),
        high_freq_factor=get("high_freq_factor", float, default=4.0),
        original_context=get("original_max_position_embeddings", int, default=8192),
    )


def _rope_from_gguf(meta: Mapping[str, Any], get) -> RopeConfig:
    rtype = meta.get("llama.rope.scaling.type", "none")
    theta = get("llama.rope.freq_base", float, default=10000.0)
    if rtype in ("none", None):
        return RopeConfig(theta=theta)
    if rtype == "linear":
        return RopeConfig(theta=theta, type="linear", factor=get("llama.rope.scaling.factor", float))
    raise UnsupportedModelError(f"GGUF rope scaling type {rtype!r} is not supported; supported: none, linear")
