"""Checkpoint tensor names, as data: logical weight name -> name in each checkpoint format,
one table per family (ModelConfig.names picks it).

`{}` stands for the layer index. Logical names are the keys of ModelConfig.weight_shapes().
"""

LLAMA_HF = {
    "embed": "model.embed_tokens.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
    "attn_norm": "model.layers.{}.input_layernorm.weight",
    "mlp_norm": "model.layers.{}.post_attention_layernorm.weight",
    "q": "model.layers.{}.self_attn.q_proj.weight",
    "k": "model.layers.{}.self_attn.k_proj.weight",
    "v": "model.layers.{}.self_attn.v_proj.weight",
    "o": "model.layers.{}.self_attn.o_proj.weight",
    "q_bias": "model.layers.{}.self_attn.q_proj.bias",
    "k_bias": "model.layers.{}.self_attn.k_proj.bias",
    "v_bias": "model.layers.{}.self_attn.v_proj.bias",
    "o_bias": "model.layers.{}.self_attn.o_proj.bias",
    "gate": "model.layers.{}.mlp.gate_proj.weight",
    "up": "model.layers.{}.mlp.up_proj.weight",
    "down": "model.layers.{}.mlp.down_proj.weight",
    "gate_bias": "model.layers.{}.mlp.gate_proj.bias",
    "up_bias": "model.layers.{}.mlp.up_proj.bias",
    "down_bias": "model.layers.{}.mlp.down_proj.bias",
}

# Gemma 3: "post_attention_layernorm" is the norm after attention, not the one before the MLP.
GEMMA3_HF = {
    **LLAMA_HF,
    "mlp_norm": "model.layers.{}.pre_feedforward_layernorm.weight",
    "post_attn_norm": "model.layers.{}.post_attention_layernorm.weight",
    "post_mlp_norm": "model.layers.{}.post_feedforward_layernorm.weight",
    "q_norm": "model.layers.{}.self_attn.q_norm.weight",
    "k_norm": "model.layers.{}.self_attn.k_norm.weight",
}

LLAMA_GGUF = {
    "embed": "token_embd.weight",
    "norm": "output_norm.weight",
    "lm_head": "output.weight",
    "rope_freqs": "rope_freqs.weight",
    "attn_norm": "blk.{}.attn_norm.weight",
    "mlp_norm": "blk.{}.ffn_norm.weight",
    "q": "blk.{}.attn_q.weight",
    "k": "blk.{}.attn_k.weight",
    "v": "blk.{}.attn_v.weight",
    "o": "blk.{}.attn_output.weight",
    "q_bias": "blk.{}.attn_q.bias",
    "k_bias": "blk.{}.attn_k.bias",
    "v_bias": "blk.{}.attn_v.bias",
    "o_bias": "blk.{}.attn_output.bias",
    "gate": "blk.{}.ffn_gate.weight",
    "up": "blk.{}.ffn_up.weight",
    "down": "blk.{}.ffn_down.weight",
}

GEMMA3_GGUF = {
    **LLAMA_GGUF,
    "post_attn_norm": "blk.{}.post_attention_norm.weight",
    "post_mlp_norm": "blk.{}.post_ffw_norm.weight",
    "q_norm": "blk.{}.attn_q_norm.weight",
    "k_norm": "blk.{}.attn_k_norm.weight",
}

HF_NAMES = {"llama": LLAMA_HF, "gemma3": GEMMA3_HF}
GGUF_NAMES = {"llama": LLAMA_GGUF, "gemma3": GEMMA3_GGUF}
# Whether llama.cpp's converter interleaved the q/k rows for its rotary kernel (Llama does; Gemma,
# whose rope llama.cpp runs in NeoX order, does not).
GGUF_PERMUTED_QK = {"llama": True, "gemma3": False}

# Per-layer weights the graph needs, in the order they are read; biases are added
# by the config's bias flags, the rest by the config flag that names them.
LAYER_WEIGHTS = ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")
FLAG_WEIGHTS = {"qk_norm": ("q_norm", "k_norm"), "sandwich_norms": ("post_attn_norm", "post_mlp_norm")}


def layer_weights(cfg) -> tuple[str, ...]:
    """The per-layer weights a ModelConfig's graph reads (biases aside)."""
    return LAYER_WEIGHTS + tuple(k for flag, keys in FLAG_WEIGHTS.items() if getattr(cfg, flag) for k in keys)


def checkpoint_name(table: dict[str, str], key: str, layer: int | None = None) -> str:
    name = table[key]
    return name.format(layer) if layer is not None else name
