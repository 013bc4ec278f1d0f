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



@dataclass(frozen=True)
class Family:
    """How one family's graph departs from Llama's: a row of choices, read once by the readers."""

    names: str = "llama"  # the names.py tables (HF and GGUF checkpoint names)
    qkv_bias: bool = False  # q/k/v always have a bias (Qwen2)
    attention_bias: bool = True  # config.json's attention_bias adds q/k/v/o biases
    windows: str = "none"  # sliding windows: "none", "all" (Mistral) or "by_layer" (layer_types)
    activation: str = "silu"  # the gated MLP's default activation, an ACTIVATIONS value
    norm_offset: float = 0.0  # HF checkpoints store RMSNorm weights as w - norm_offset (Gemma: 1)
    qk_norm: bool = False  # RMSNorm over each q and k head before rope
    sandwich_norms: bool = False  # norms after attention and after the MLP too, before the residual add
    embed_scale: bool = False  # embeddings times sqrt(hidden)
    query_scalar: bool = False  # scores scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5
    # attn_logit_softcapping honoured. Not by Gemma 3: transformers' Gemma3Attention (5.x) never passes
    # it to its attention function, nor does llama.cpp's gemma3 graph; a config value there is inert.
    attn_softcap: bool = False
    global_theta: float = 10000.0  # rope base when the config names none
    local_theta: float | None = None  # rope base of sliding layers (rope_local_base_freq); None: the global rope
    window_pattern: int = 0  # "by_layer" without layer_types: every window_pattern-th layer is global


GEMMA3 = Family(names="gemma3", attention_bias=True, windows="by_layer", activation="gelu_tanh", norm_offset=1.0,
                qk_norm=True, sandwich_norms=True, embed_scale=True, query_scalar=True, global_theta=1e6,
                local_theta=1e4, window_pattern=6)

# HF architecture name -> family traits the graph needs to know about.
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": Family(),
    "MistralForCausalLM": Family(attention_bias=False, windows="all"),
    "Qwen2ForCausalLM": Family(qkv_bias=True, attention_bias=False),
    "Gemma3ForCausalLM": GEMMA3,
}
# GGUF general.architecture -> the HF architecture it holds (its metadata keys start with "<arch>.").
GGUF_ARCHITECTURES = {"llama": "LlamaForCausalLM", "gemma3": "Gemma3ForCausalLM"}
# config.json's activation names -> the graph's (graph.ACTIVATIONS).
ACTIVATIONS = {"silu": "silu", "gelu_pytorch_tanh": "gelu_tanh"}
LAYER_TYPES = {"full_attention": "full", "sliding_attention": "sliding"}
ROPE_TYPES = ("default", "linear", "llama3")
# Appended to the errors of what only the native builder lacks (exporter/via_optimum.py covers more).
VIA_OPTIMUM_HINT = "; try 'edgellama export --via optimum' (needs optimum-onnx: pip install 'optimum-onnx>=0.1')"


_FIX = "fix the config or re-download the model"
_MAX_LAYERS = 4096  # a bound for per-layer tables built from a count alone


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
    sliding_window: int | None = None  # attend to at most this many keys (the query's own included)
    names: str = "llama"  # the names.py tables this checkpoint's tensors are named by
    activation: str = "silu"  # the gated MLP's, a graph.ACTIVATIONS key
    norm_offset: float = 0.0  # RMSNorm multiplies by (norm_offset + w): HF Gemma 1, GGUF 0 (folded in)
    qk_norm: bool = False  # RMSNorm (q_norm / k_norm) over each head of q and k, before rope
    sandwich_norms: bool = False  # post_attn_norm / post_mlp_norm on each branch before its residual add
    embed_scale: float = 1.0  # embeddings times this (Gemma: sqrt(hidden), rounded to the table's dtype)
    query_scale: float | None = None  # attention scores times this; None: head_dim ** -0.5
    attn_softcap: float | None = None  # scores -> c * tanh(scores / c) before the mask
    final_softcap: float | None = None  # logits -> c * tanh(logits / c)
    layer_types: tuple[str, ...] = ()  # per layer "full" | "sliding"; (): every layer slides iff sliding_window
    local_rope: RopeConfig | None = None  # the sliding layers' rope; None: `rope`

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
        for name in ("query_scale", "attn_softcap", "final_softcap"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise BadModelFileError(f"model config: {name} must be a positive number, got {value!r}; {_FIX}")
        if self.layer_types and (len(self.layer_types) != self.num_layers
                                 or not set(self.layer_types) <= {"full", "sliding"}):
            raise BadModelFileError(f"model config: layer_types must name 'full_attention' or 'sliding_attention' "
                                    f"for each of the {self.num_layers} layers; {_FIX}")

    def window(self, layer: int) -> int | None:
        """The sliding window of `layer`'s attention; None attends to every earlier key."""
        if self.layer_types and self.layer_types[layer] == "full":
            return None
        return self.sliding_window

    def layer_rope(self, layer: int) -> RopeConfig:
        return self.local_rope if self.local_rope is not None and self.window(layer) else self.rope

    @property
    def attn_scale(self) -> float:
        return self.query_scale if self.query_scale is not None else self.head_dim ** -0.5

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
            "post_attn_norm": (H,),
            "post_mlp_norm": (H,),
            "q_norm": (self.head_dim,),
            "k_norm": (self.head_dim,),
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
        fam = SUPPORTED_ARCHITECTURES[arch]
        act_name = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
        if not isinstance(act_name, str) or act_name not in ACTIVATIONS:
            raise UnsupportedModelError(f"{where}: hidden activation {act_name!r}; the native exporter "
                                        f"supports {', '.join(map(repr, ACTIVATIONS))}{VIA_OPTIMUM_HINT}")
        if fam.windows == "none" and cfg.get("use_sliding_window"):
            raise UnsupportedModelError(f"{where}: {arch} with use_sliding_window=true is not supported"
                                        f"{VIA_OPTIMUM_HINT}")
        if cfg.get("use_bidirectional_attention"):
            raise UnsupportedModelError(f"{where}: use_bidirectional_attention=true is not a causal decoder; "
                                        f"not supported{VIA_OPTIMUM_HINT}")
        get = _getter(cfg, where)
        hidden, heads = get("hidden_size", int), get("num_attention_heads", int)
        layers = get("num_hidden_layers", int)
        attention_bias = fam.attention_bias and bool(cfg.get("attention_bias", False))
        window = get("sliding_window", int, default=None) if fam.windows != "none" else None
        head_dim = get("head_dim", int, default=hidden // heads if heads else 0)
        return cls(
            architecture=arch,
            vocab_size=get("vocab_size", int),
            hidden_size=hidden,
            intermediate_size=get("intermediate_size", int),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get("num_key_value_heads", int, default=heads),
            head_dim=head_dim,
            rms_eps=get("rms_norm_eps", float, default=1e-6),
            context_length=get("max_position_embeddings", int, default=2048),
            rope=_rope_from_hf(cfg, where, "full_attention", fam.global_theta, scaled=True),
            tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=fam.qkv_bias or attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=window or None,
            names=fam.names,
            activation=ACTIVATIONS[act_name],
            norm_offset=fam.norm_offset,
            qk_norm=fam.qk_norm,
            sandwich_norms=fam.sandwich_norms,
            embed_scale=math.sqrt(hidden) if fam.embed_scale and hidden > 0 else 1.0,
            query_scale=_inv_sqrt(get("query_pre_attn_scalar", float, default=256.0), "query_pre_attn_scalar", where)
            if fam.query_scalar else None,
            attn_softcap=get("attn_logit_softcapping", float, default=None) if fam.attn_softcap else None,
            final_softcap=get("final_logit_softcapping", float, default=None),
            layer_types=_layer_types_from_hf(cfg, fam, layers, where),
            local_rope=(_rope_from_hf(cfg, where, "sliding_attention", fam.local_theta, scaled=False,
                                      key="rope_local_base_freq") if fam.local_theta is not None else None),
        )

    @classmethod
    def from_gguf(cls, meta: Mapping[str, Any], tensor_names: set[str], where: str) -> "ModelConfig":
        arch = meta.get("general.architecture")
        if not isinstance(arch, str) or arch not in GGUF_ARCHITECTURES:
            raise UnsupportedModelError(
                f"{where}: GGUF architecture {arch!r} is not supported; supported: 'llama' "
                "(Llama 2/3, Mistral, SmolLM, TinyLlama, CodeLlama), 'gemma3' (Gemma 3 text)"
            )
        fam = SUPPORTED_ARCHITECTURES[GGUF_ARCHITECTURES[arch]]
        get = _getter(meta, where)
        key = lambda name: f"{arch}.{name}"  # noqa: E731
        hidden, heads = get(key("embedding_length"), int), get(key("attention.head_count"), int)
        layers = get(key("block_count"), int)
        head_dim = get(key("attention.key_length"), int, default=hidden // heads if heads else 0)
        tokens = meta.get("tokenizer.ggml.tokens")
        vocab = get(key("vocab_size"), int, default=len(tokens) if isinstance(tokens, list) else 0)
        window = get(key("attention.sliding_window"), int, default=None) if fam.windows != "none" else None
        return cls(
            architecture=GGUF_ARCHITECTURES[arch],
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=get(key("feed_forward_length"), int),
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=get(key("attention.head_count_kv"), int, default=heads),
            head_dim=head_dim,
            rms_eps=get(key("attention.layer_norm_rms_epsilon"), float, default=1e-5),
            context_length=get(key("context_length"), int, default=2048),
            rope=_rope_from_gguf(meta, get, arch, fam.global_theta),
            tie_embeddings="output.weight" not in tensor_names,
            sliding_window=window or None,
            names=fam.names,
            activation=fam.activation,
            # llama.cpp's converter stores Gemma's norm weights as 1 + w already
            qk_norm=fam.qk_norm,
            sandwich_norms=fam.sandwich_norms,
            embed_scale=math.sqrt(hidden) if fam.embed_scale and hidden > 0 else 1.0,
            query_scale=_inv_sqrt(_gguf_query_scalar(layers, hidden, heads, head_dim), "attention scale", where)
            if fam.query_scalar else None,
            attn_softcap=get(key("attn_logit_softcapping"), float, default=None) if fam.attn_softcap else None,
            final_softcap=get(key("final_logit_softcapping"), float, default=None),
            layer_types=_pattern_layer_types(get(key("attention.sliding_window_pattern"), int,
                                                 default=fam.window_pattern), layers) if fam.windows == "by_layer" else (),
            local_rope=(RopeConfig(theta=get(key("rope.freq_base_swa"), float, default=fam.local_theta))
                        if fam.local_theta is not None else None),
        )


def _gguf_query_scalar(layers: int, hidden: int, heads: int, head_dim: int) -> float:
    """Gemma 3's query_pre_attn_scalar, which its GGUF does not carry: llama.cpp's rule
    (llama-model.cpp, LLM_ARCH_GEMMA3): hidden / heads for the 27B model (62 blocks), else head_dim."""
    return hidden / heads if layers == 62 and heads else float(head_dim)


def _inv_sqrt(value: float, what: str, where: str) -> float:
    if not (math.isfinite(value) and value > 0):
        raise BadModelFileError(f"{where}: {what} must be a positive number, got {value!r}; {_FIX}")
    return value ** -0.5


def _pattern_layer_types(pattern: int, layers: int) -> tuple[str, ...]:
    """Every `pattern`-th layer global, the others sliding (transformers' sliding_window_pattern)."""
    if pattern <= 0 or not 0 < layers <= _MAX_LAYERS:  # ModelConfig refuses a non-positive count
        if layers > _MAX_LAYERS:
            raise BadModelFileError(f"model config: {layers} layers is more than any model has "
                                    f"(at most {_MAX_LAYERS} here); {_FIX}")
        return ()
    return tuple("sliding" if (i + 1) % pattern else "full" for i in range(layers))


def _layer_types_from_hf(cfg: Mapping[str, Any], fam: Family, layers: int, where: str) -> tuple[str, ...]:
    if fam.windows != "by_layer":
        return ()
    names = cfg.get("layer_types")
    if names is None:
        pattern = _getter(cfg, where)("sliding_window_pattern", int, default=fam.window_pattern)
        return _pattern_layer_types(pattern, layers)
    if not isinstance(names, list) or len(names) != layers or not all(isinstance(n, str) and n in LAYER_TYPES
                                                                        for n in names):
        raise BadModelFileError(f"{where}: layer_types must list {layers} of {', '.join(LAYER_TYPES)}; {_FIX}")
    return tuple(LAYER_TYPES[n] for n in names)


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


def _rope_from_hf(cfg: Mapping[str, Any], where: str, layer_type: str, default_theta: float | None,
                  scaled: bool, key: str = "rope_theta") -> RopeConfig:
    """The rope of one layer type. transformers >= 5 writes "rope_parameters" (theta inside), nested
    by layer type for families that mix them (Gemma 3); older configs write `key` ("rope_theta",
    Gemma 3's sliding layers "rope_local_base_freq") plus an optional "rope_scaling"."""
    params, scaling = cfg.get("rope_parameters") or {}, (cfg.get("rope_scaling") or {}) if scaled else {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise BadModelFileError(f"{where}: rope_parameters / rope_scaling must be objects; {_FIX}")
    if set(params) & set(LAYER_TYPES):
        params = params.get(layer_type) or {}
        if not isinstance(params, dict):
            raise BadModelFileError(f"{where}: rope_parameters[{layer_type!r}] must be an object; {_FIX}")
    params = {**scaling, **params}
    rtype = params.get("rope_type", params.get("type", "default")) or "default"
    if not isinstance(rtype, str) or rtype not in ROPE_TYPES:
        raise UnsupportedModelError(
            f"{where}: rope scaling type {rtype!r} is not supported; supported: {', '.join(ROPE_TYPES)}"
            f"{VIA_OPTIMUM_HINT}"
        )
    get = _getter({"rope_theta": cfg.get(key), **params}, where)
    return RopeConfig(
        theta=get("rope_theta", float, default=default_theta),
        type=rtype,
        factor=get("factor", float, default=1.0),
        low_freq_factor=get("low_freq_factor", float, default=1.0),
        high_freq_factor=get("high_freq_factor", float, default=4.0),
        original_context=get("original_max_position_embeddings", int, default=8192),
    )


def _rope_from_gguf(meta: Mapping[str, Any], get, arch: str, default_theta: float) -> RopeConfig:
    rtype = meta.get(f"{arch}.rope.scaling.type", "none")
    theta = get(f"{arch}.rope.freq_base", float, default=default_theta)
    if rtype in ("none", None):
        return RopeConfig(theta=theta)
    if rtype == "linear":
        return RopeConfig(theta=theta, type="linear", factor=get(f"{arch}.rope.scaling.factor", float))
    raise UnsupportedModelError(f"GGUF rope scaling type {rtype!r} is not supported; supported: none, linear")
