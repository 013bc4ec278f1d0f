"""The decoder graph, built block by block straight from the weights.

Shapes in comments: B batch, S new tokens, P past tokens, T = P + S, H hidden,
nh / kv heads, hd head_dim, I intermediate, V vocab.

Two attention variants, chosen by `choose_attention` from ONNX Runtime's constraints:
  "gqa"      com.microsoft GroupQueryAttention with packed QKV and built-in rotary; its
             past and present may share one preallocated buffer (runtime IO binding).
  "standard" plain ONNX ops (MatMul, Softmax, Concat); past and present are separate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Protocol, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellama.buildkit.graph_writer import MS, OPSET, GraphWriter
from edgellama.runtime import contract as io

from .config import ModelConfig

_ONNX_TYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.float16): TensorProto.FLOAT16}


@dataclass(frozen=True)
class GraphPlan:
    dtype: str  # "fp32" | "fp16"
    attention: str  # "gqa" | "standard"

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(np.float16 if self.dtype == "fp16" else np.float32)

    @property
    def onnx_dtype(self) -> int:
        return _ONNX_TYPES[self.np_dtype]


def choose_attention(cfg: ModelConfig) -> tuple[str, str]:
    """("gqa" | "standard", reason). GroupQueryAttention's kernels need head_dim a multiple
    of 16 (CPU rotary and CUDA flash/memory-efficient paths) and at most 256."""
    if cfg.head_dim % 16 or cfg.head_dim > 256:
        return "standard", f"head_dim {cfg.head_dim} is not a multiple of 16 in [16, 256]"
    return "gqa", "GroupQueryAttention supports this shape"


# ---- small blocks -------------------------------------------------------------------------

def rms_norm(g: GraphWriter, x: str, weight: str, eps: float) -> str:
    return g.op("SimplifiedLayerNormalization", [x, weight], axis=-1, epsilon=eps, stash_type=1)


def skip_rms_norm(g: GraphWriter, x: str, skip: str, weight: str, eps: float) -> tuple[str, str]:
    """(normed, x + skip): the residual add fused with the next norm."""
    out, _, _, summed = g.op("SkipSimplifiedLayerNormalization", [x, skip, weight], n_out=4, domain=MS, epsilon=eps)
    return out, summed


def swiglu(g: GraphWriter, gate_up: str, inter: int) -> str:
    """(B, S, 2I) -> (B, S, I): silu(gate) * up."""
    split = g.const(np.array([inter, inter], np.int64), "split")
    gate, up = g.op("Split", [gate_up, split], n_out=2, axis=-1)
    silu = g.op("Mul", [gate, g.op("Sigmoid", [gate])])
    return g.op("Mul", [silu, up])


def rope_tables(cfg: ModelConfig, inv_freq: np.ndarray, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin: (context_length, hd/2), computed in float64 then cast."""
    pos = np.arange(cfg.context_length, dtype=np.float64)[:, None]
    angles = pos * inv_freq[None, :]
    return np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


# ---- shared inputs --------------------------------------------------------------------------

@dataclass
class Inputs:
    """What every layer's attention reads, derived once from input_ids / attention_mask."""

    seqlens_k: str | None = None  # (B,) int32: valid tokens - 1   (gqa)
    total_len: str | None = None  # () int32: T                    (gqa)
    positions: str | None = None  # (S,) int64: P .. T-1           (standard)
    bias: str | None = None  # (B, 1, 1, S, T) float additive mask (standard)
    dtype: np.dtype = np.dtype(np.float32)


def gqa_inputs(g: GraphWriter) -> Inputs:
    mask32 = g.op("Cast", [io.ATTENTION_MASK], to=TensorProto.INT32)
    total = g.op("ReduceSum", [mask32, g.const(np.array([1], np.int64))], keepdims=0)
    seqlens = g.op("Sub", [total, g.const(np.array(1, np.int32))])
    width = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), g.const(np.array(1, np.int64))], axis=0)
    return Inputs(seqlens_k=seqlens,
                  total_len=g.op("Cast", [width], to=TensorProto.INT32))


def standard_inputs(g: GraphWriter, cfg: ModelConfig, dtype: np.dtype) -> Inputs:
    """Positions and the additive causal/padding/window mask; no left padding (P = T - S)."""
    i64 = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
    seq = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), i64(1)], axis=0)  # S
    total = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), i64(1)], axis=0)  # T
    past = g.op("Sub", [total, seq])  # P
    positions = g.op("Range", [past, total, i64(1)])  # (S,)
    keys = g.op("Range", [i64(0), total, i64(1)])  # (T,)
    q_pos = g.op("Unsqueeze", [positions, i64([1])])  # (S, 1)
    allowed = g.op("LessOrEqual", [keys, q_pos])  # (S, T) causal
    if cfg.sliding_window:
        lo = g.op("Sub", [q_pos, i64(cfg.sliding_window)])
        allowed = g.op("And", [allowed, g.op("Greater", [keys, lo])])
    valid = g.op("Cast", [io.ATTENTION_MASK], to=TensorProto.BOOL)  # (B, T)
    valid = g.op("Unsqueeze", [valid, i64([1, 2, 3])])  # (B, 1, 1, 1, T)
    allowed = g.op("And", [allowed, valid])  # (B, 1, 1, S, T)
    neg = g.const(np.array(np.finfo(dtype).min, dtype))
    bias = g.op("Where", [allowed, g.const(np.array(0, dtype)), neg])
    return Inputs(positions=positions, bias=bias, dtype=dtype)


# ---- attention ------------------------------------------------------------------------------

def attention_gqa(g: GraphWriter, cfg: ModelConfig, qkv: str, layer: int, inp: Inputs, cos: str, sin: str) -> str:
    """qkv (B, S, (nh + 2 kv) hd) -> (B, S, nh*hd); present.{layer} written in place when
    buffers are shared."""
    attrs = dict(num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, scale=float(cfg.head_dim ** -0.5),
                 do_rotary=1, rotary_interleaved=0, local_window_size=_gqa_window(cfg))
    out, _, _ = g.op(
        "GroupQueryAttention",
        [qkv, "", "", io.past_key(layer), io.past_value(layer), inp.seqlens_k, inp.total_len, cos, sin],
        outputs=[g.fresh("attn"), io.present_key(layer), io.present_value(layer)],
        domain=MS, **attrs,
    )
    return out


def _gqa_window(cfg: ModelConfig) -> int:
    # Both count the query's own key: a query at p sees keys p - window + 1 .. p.
    return cfg.sliding_window if cfg.sliding_window else -1


def attention_standard(g: GraphWriter, cfg: ModelConfig, qkv: str, layer: int, inp: Inputs, cos: str, sin: str) -> str:
    i64 = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
    nh, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", [qkv, i64([nh * hd, kv * hd, kv * hd])], n_out=3, axis=-1)
    q = _heads(g, q, nh, hd)  # (B, nh, S, hd)
    k = _heads(g, k, kv, hd)  # (B, kv, S, hd)
    v = _heads(g, v, kv, hd)
    cos_s = g.op("Gather", [cos, inp.positions], axis=0)  # (S, hd/2)
    sin_s = g.op("Gather", [sin, inp.positions], axis=0)
    q, k = _rotate(g, q, cos_s, sin_s), _rotate(g, k, cos_s, sin_s)
    k = g.op("Concat", [io.past_key(layer), k], axis=2, outputs=[io.present_key(layer)])  # (B, kv, T, hd)
    v = g.op("Concat", [io.past_value(layer), v], axis=2, outputs=[io.present_value(layer)])
    # Group query heads under their kv head: (B, kv, nh/kv, S, hd) against (B, kv, 1, T, hd).
    q = g.op("Reshape", [q, i64([0, kv, nh // kv, -1, hd])])
    kt = g.op("Unsqueeze", [g.op("Transpose", [k], perm=[0, 1, 3, 2]), i64([2])])  # (B, kv, 1, hd, T)
    scores = g.op("Mul", [g.op("MatMul", [q, kt]), g.const(np.array(hd ** -0.5, inp.dtype))])
    probs = g.op("Softmax", [g.op("Add", [scores, inp.bias])], axis=-1)  # (B, kv, g, S, T)
    ctx = g.op("MatMul", [probs, g.op("Unsqueeze", [v, i64([2])])])  # (B, kv, g, S, hd)
    ctx = g.op("Reshape", [ctx, i64([0, nh, -1, hd])])
    ctx = g.op("Transpose", [ctx], perm=[0, 2, 1, 3])  # (B, S, nh, hd)
    return g.op("Reshape", [ctx, i64([0, 0, nh * hd])])


def _heads(g: GraphWriter, x: str, n: int, hd: int) -> str:
    x = g.op("Reshape", [x, g.const(np.array([0, 0, n, hd], np.int64))])
    return g.op("Transpose", [x], perm=[0, 2, 1, 3])


def _rotate(g: GraphWriter, x: str, cos: str, sin: str) -> str:
    """Rotate-half RoPE: x (B, h, S, hd) with cos/sin (S, hd/2)."""
    x1, x2 = g.op("Split", [x], n_out=2, axis=-1)
    out1 = g.op("Sub", [g.op("Mul", [x1, cos]), g.op("Mul", [x2, sin])])
    out2 = g.op("Add", [g.op("Mul", [x2, cos]), g.op("Mul", [x1, sin])])
    return g.op("Concat", [out1, out2], axis=-1)


ATTENTION = {"gqa": attention_gqa, "standard": attention_standard}


# ---- the decoder ----------------------------------------------------------------------------

class Weights(Protocol):
    """Float32 tensors in checkpoint layout (out, in) by logical name (see names.py)."""

    def get(self, key: str, layer: int | None = None) -> np.ndarray: ...
    def has(self, key: str, layer: int | None = None) -> bool: ...
    def row_chunks(self, key: str, layer: int | None = None) -> Iterator[np.ndarray]: ...


class FloatProjections:
    """How weights become graph pieces in a float export; quantized.py has the
    block-quantized twin with the same three methods."""

    def __init__(self, dtype: np.dtype):
        self.dtype = dtype
        self._table: str | None = None

    def linear(self, g: GraphWriter, x: str, name: str, w: Weights, keys: Sequence[str], layer: int) -> str:
        """x (..., K) -> (..., N) with W = the `keys` weights stacked on N."""
        mat = np.concatenate([w.get(k, layer) for k in keys])  # (N, K)
        return g.op("MatMul", [x, g.weight(f"{name}.weight", np.asarray(mat.T, self.dtype))])

    def embedding(self, g: GraphWriter, w: Weights) -> str:
        """input_ids (B, S) -> (B, S, H); the (V, H) table is streamed in row chunks."""
        self._table = g.weight_chunks("embed.weight", (np.asarray(c, self.dtype) for c in w.row_chunks("embed")))
        return g.op("Gather", [self._table, io.INPUT_IDS], axis=0)

    def lm_head(self, g: GraphWriter, h: str, w: Weights, cfg: ModelConfig) -> str:
        """(B, K, H) -> (B, K, V) float32 logits; a tied table is stored once."""
        table = self._table if cfg.tie_embeddings or not w.has("lm_head") else g.weight_chunks(
            "lm_head.weight", (np.asarray(c, self.dtype) for c in w.row_chunks("lm_head")))
        return lm_head(g, h, table, cfg.hidden_size, cfg.vocab_size)


def build_decoder(g: GraphWriter, cfg: ModelConfig, plan: GraphPlan, weights: Weights, inv_freq: np.ndarray,
                  proj=None, on_layer: Callable[[int], None] = lambda i: None) -> onnx.ModelProto:
    """Reads each weight once, in graph order, writing it out before reading the next."""
    dt = plan.np_dtype
    proj = proj or FloatProjections(dt)
    small = lambda name, key, layer=None: g.weight(name, np.asarray(weights.get(key, layer), dt))  # noqa: E731
    bias = lambda name, keys, layer, on: (  # noqa: E731
        g.weight(name, np.asarray(np.concatenate([weights.get(k, layer) for k in keys]), dt)) if on else None)
    add = lambda y, b: g.op("Add", [y, b]) if b else y  # noqa: E731
    cos_t, sin_t = rope_tables(cfg, inv_freq, dt)
    cos, sin = g.weight("rope.cos", cos_t), g.weight("rope.sin", sin_t)
    inp = gqa_inputs(g) if plan.attention == "gqa" else standard_inputs(g, cfg, dt)
    attend = ATTENTION[plan.attention]

    x = proj.embedding(g, weights)  # (B, S, H)
    h, residual = rms_norm(g, x, small("layers.0.attn_norm", "attn_norm", 0), cfg.rms_eps), x
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        qkv = add(proj.linear(g, h, f"{p}.qkv", weights, ("q", "k", "v"), i),
                  bias(f"{p}.qkv.bias", ("q_bias", "k_bias", "v_bias"), i, cfg.qkv_bias))
        attn = attend(g, cfg, qkv, i, inp, cos, sin)
        attn = add(proj.linear(g, attn, f"{p}.o", weights, ("o",), i), bias(f"{p}.o.bias", ("o_bias",), i, cfg.o_bias))
        h, residual = skip_rms_norm(g, attn, residual, small(f"{p}.mlp_norm", "mlp_norm", i), cfg.rms_eps)
        gate_up = add(proj.linear(g, h, f"{p}.gate_up", weights, ("gate", "up"), i),
                      bias(f"{p}.gate_up.bias", ("gate_bias", "up_bias"), i, cfg.mlp_bias))
        act = swiglu(g, gate_up, cfg.intermediate_size)
        mlp = add(proj.linear(g, act, f"{p}.down", weights, ("down",), i), bias(f"{p}.down.bias", ("down_bias",), i, cfg.mlp_bias))
        last = i + 1 == cfg.num_layers
        norm = small("norm.weight", "norm") if last else small(f"layers.{i + 1}.attn_norm", "attn_norm", i + 1)
        h, residual = skip_rms_norm(g, mlp, residual, norm, cfg.rms_eps)
        on_layer(i)

    logits = proj.lm_head(g, keep_last(g, h), weights, cfg)
    if dt != np.float32 or g.nodes[-1].output[0] != logits:
        g.op("Cast", [logits], to=TensorProto.FLOAT, outputs=[io.LOGITS])
    else:
        g.nodes[-1].output[0] = io.LOGITS
    return _model(g, cfg, plan)


def keep_last(g: GraphWriter, h: str) -> str:
    """(B, S, H) -> (B, K, H): the last K = num_logits_to_keep positions; 0 keeps all.

    A prefill only needs the last position's logits: skipping the others saves the
    (S, H) x (H, V) product and an (S, V) output. The input is onnxruntime-genai's
    num_logits_to_keep ((1,) int64; genai feeds 0), a plain input: an initializer standing
    in as its default would make ORT warn on every load."""
    starts = g.op("Neg", [io.LOGITS_TO_KEEP])
    big = g.const(np.array([np.iinfo(np.int64).max], np.int64))
    return g.op("Slice", [h, starts, big, g.const(np.array([1], np.int64))])


def lm_head(g: GraphWriter, h: str, weight_v_h: str, hidden: int, vocab: int) -> str:
    """(B, K, H) x (V, H)^T -> (B, K, V) via Gemm(transB) so a tied table is stored once."""
    flat = g.op("Reshape", [h, g.const(np.array([-1, hidden], np.int64))])
    logits = g.op("Gemm", [flat, weight_v_h], transB=1)
    lead = g.op("Slice", [g.op("Shape", [h]), g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64))])
    shape = g.op("Concat", [lead, g.const(np.array([vocab], np.int64))], axis=0)
    return g.op("Reshape", [logits, shape])


def _model(g: GraphWriter, cfg: ModelConfig, plan: GraphPlan) -> onnx.ModelProto:
    kv_t = plan.onnx_dtype
    kv_shape = lambda seq: ["batch", cfg.num_kv_heads, seq, cfg.head_dim]  # noqa: E731
    inputs = [helper.make_tensor_value_info(io.INPUT_IDS, TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info(io.ATTENTION_MASK, TensorProto.INT64, ["batch", "total_seq"]),
              helper.make_tensor_value_info(io.LOGITS_TO_KEEP, TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info(io.LOGITS, TensorProto.FLOAT, ["batch", "seq", cfg.vocab_size])]
    for i in range(cfg.num_layers):
        inputs += [helper.make_tensor_value_info(n(i), kv_t, kv_shape("past_seq")) for n in (io.past_key, io.past_value)]
        outputs += [helper.make_tensor_value_info(n(i), kv_t, kv_shape("total_seq")) for n in (io.present_key, io.present_value)]
    graph = helper.make_graph(g.nodes, "edgellama_decoder", inputs, outputs, initializer=g.initializers)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)]
    return helper.make_model(graph, opset_imports=opsets, producer_name="edgellama", ir_version=9)
