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
    of 16 (CPU rotary and CUDA flash/memory-efficient paths) and at most 256; its `softcap`
    and `local_window_size` attributes cover score soft-capping and sliding windows."""
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


def head_rms_norm(g: GraphWriter, x: str, weight: str, heads: int, hd: int, eps: float) -> str:
    """(B, S, heads*hd) -> the same, each head RMS-normed over its hd values (q_norm / k_norm)."""
    x = g.op("Reshape", [x, g.const(np.array([0, 0, heads, hd], np.int64))])
    x = rms_norm(g, x, weight, eps)
    return g.op("Reshape", [x, g.const(np.array([0, 0, heads * hd], np.int64))])


def silu(g: GraphWriter, x: str, dtype: np.dtype) -> str:
    return g.op("Mul", [x, g.op("Sigmoid", [x])])


def gelu_tanh(g: GraphWriter, x: str, dtype: np.dtype) -> str:
    """0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), torch's gelu(approximate="tanh"), in plain
    ops so any dtype and provider runs it (onnxruntime fuses the pattern where it has a kernel)."""
    c = lambda v: g.const(np.array(v, dtype))  # noqa: E731
    cube = g.op("Mul", [g.op("Mul", [x, x]), x])
    inner = g.op("Mul", [g.op("Add", [x, g.op("Mul", [cube, c(0.044715)])]), c(np.sqrt(2 / np.pi))])
    half_x = g.op("Mul", [x, c(0.5)])
    return g.op("Mul", [half_x, g.op("Add", [g.op("Tanh", [inner]), c(1.0)])])


ACTIVATIONS = {"silu": silu, "gelu_tanh": gelu_tanh}


def gated_mlp_act(g: GraphWriter, gate_up: str, inter: int, activation: str, dtype: np.dtype) -> str:
    """(B, S, 2I) -> (B, S, I): act(gate) * up."""
    split = g.const(np.array([inter, inter], np.int64), "split")
    gate, up = g.op("Split", [gate_up, split], n_out=2, axis=-1)
    return g.op("Mul", [ACTIVATIONS[activation](g, gate, dtype), up])


def softcap(g: GraphWriter, x: str, cap: float, dtype: np.dtype) -> str:
    """c * tanh(x / c)."""
    c = g.const(np.array(cap, dtype))
    return g.op("Mul", [g.op("Tanh", [g.op("Div", [x, c])]), c])


# ---- shared inputs --------------------------------------------------------------------------

@dataclass
class Inputs:
    """What every layer's attention reads, derived once from input_ids / attention_mask."""

    seqlens_k: str | None = None  # (B,) int32: valid tokens - 1   (gqa)
    total_len: str | None = None  # () int32: T                    (gqa)
    positions: str | None = None  # (S,) int64: P .. T-1           (standard)
    bias: dict[int | None, str] | None = None  # sliding window -> (B, 1, 1, S, T) additive mask (standard)
    dtype: np.dtype = np.dtype(np.float32)


def gqa_inputs(g: GraphWriter) -> Inputs:
    mask32 = g.op("Cast", [io.ATTENTION_MASK], to=TensorProto.INT32)
    total = g.op("ReduceSum", [mask32, g.const(np.array([1], np.int64))], keepdims=0)
    seqlens = g.op("Sub", [total, g.const(np.array(1, np.int32))])
    width = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), g.const(np.array(1, np.int64))], axis=0)
    return Inputs(seqlens_k=seqlens,
                  total_len=g.op("Cast", [width], to=TensorProto.INT32))


def standard_inputs(g: GraphWriter, cfg: ModelConfig, dtype: np.dtype) -> Inputs:
    """Positions and one additive causal/padding mask per sliding window the layers use (None:
    no window); no left padding (P = T - S)."""
    i64 = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
    seq = g.op("Gather", [g.op("Shape", [io.INPUT_IDS]), i64(1)], axis=0)  # S
    total = g.op("Gather", [g.op("Shape", [io.ATTENTION_MASK]), i64(1)], axis=0)  # T
    past = g.op("Sub", [total, seq])  # P
    positions = g.op("Range", [past, total, i64(1)])  # (S,)
    keys = g.op("Range", [i64(0), total, i64(1)])  # (T,)
    q_pos = g.op("Unsqueeze", [positions, i64([1])])  # (S, 1)
    causal = g.op("LessOrEqual", [keys, q_pos])  # (S, T)
    valid = g.op("Cast", [io.ATTENTION_MASK], to=TensorProto.BOOL)  # (B, T)
    valid = g.op("Unsqueeze", [valid, i64([1, 2, 3])])  # (B, 1, 1, 1, T)
    neg = g.const(np.array(np.finfo(dtype).min, dtype))
    bias = {}
    for window in sorted({cfg.window(i) for i in range(cfg.num_layers)}, key=lambda w: w or 0):
        allowed = causal
        if window:  # a query at p sees keys p - window + 1 .. p
            allowed = g.op("And", [allowed, g.op("Greater", [keys, g.op("Sub", [q_pos, i64(window)])])])
        allowed = g.op("And", [allowed, valid])  # (B, 1, 1, S, T)
        bias[window] = g.op("Where", [allowed, g.const(np.array(0, dtype)), neg])
    return Inputs(positions=positions, bias=bias, dtype=dtype)


# ---- attention ------------------------------------------------------------------------------

def attention_gqa(g: GraphWriter, cfg: ModelConfig, qkv: Sequence[str], layer: int, inp: Inputs,
                  cos: str, sin: str) -> str:
    """qkv: packed (B, S, (nh + 2 kv) hd), or q (B, S, nh*hd), k, v (B, S, kv*hd) -> (B, S, nh*hd);
    present.{layer} written in place when buffers are shared."""
    window = cfg.window(layer)
    # Both count the query's own key: a query at p sees keys p - window + 1 .. p.
    attrs = dict(num_heads=cfg.num_heads, kv_num_heads=cfg.num_kv_heads, scale=float(cfg.attn_scale),
                 do_rotary=1, rotary_interleaved=0, local_window_size=window or -1)
    if cfg.attn_softcap:
        attrs["softcap"] = float(cfg.attn_softcap)
    q_k_v = [*qkv, "", ""][:3]
    out, _, _ = g.op(
        "GroupQueryAttention",
        [*q_k_v, io.past_key(layer), io.past_value(layer), inp.seqlens_k, inp.total_len, cos, sin],
        outputs=[g.fresh("attn"), io.present_key(layer), io.present_value(layer)],
        domain=MS, **attrs,
    )
    return out


def attention_standard(g: GraphWriter, cfg: ModelConfig, qkv: Sequence[str], layer: int, inp: Inputs,
                       cos: str, sin: str) -> str:
    i64 = lambda v: g.const(np.array(v, np.int64))  # noqa: E731
    nh, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", [qkv[0], i64([nh * hd, kv * hd, kv * hd])], n_out=3, axis=-1) if len(qkv) == 1 else qkv
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
    scores = g.op("Mul", [g.op("MatMul", [q, kt]), g.const(np.array(cfg.attn_scale, inp.dtype))])
    if cfg.attn_softcap:
        scores = softcap(g, scores, cfg.attn_softcap, inp.dtype)
    probs = g.op("Softmax", [g.op("Add", [scores, inp.bias[cfg.window(layer)]])], axis=-1)  # (B, kv, g, S, T)
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
        return lm_head(g, h, table, cfg.hidden_size, cfg.vocab_size, self.dtype)


def build_decoder(g: GraphWriter, cfg: ModelConfig, plan: GraphPlan, weights: Weights, inv_freq: np.ndarray,
                  proj=None, on_layer: Callable[[int], None] = lambda i: None) -> onnx.ModelProto:
    """Reads each weight once, in graph order, writing it out before reading the next.
    `inv_freq` is the global rope's; sliding layers with a rope of their own (cfg.local_rope) get it."""
    dt = plan.np_dtype
    proj = proj or FloatProjections(dt)
    small = lambda name, key, layer=None: g.weight(name, np.asarray(weights.get(key, layer), dt))  # noqa: E731
    norm = lambda name, key, layer=None: g.weight(  # noqa: E731  (1 + w) for Gemma's HF weights, in float32 as HF
        name, np.asarray(weights.get(key, layer) + np.float32(cfg.norm_offset), dt))
    bias = lambda name, keys, layer, on: (  # noqa: E731
        g.weight(name, np.asarray(np.concatenate([weights.get(k, layer) for k in keys]), dt)) if on else None)
    add = lambda y, b: g.op("Add", [y, b]) if b else y  # noqa: E731
    ropes = _rope_inputs(g, cfg, inv_freq, dt)
    inp = gqa_inputs(g) if plan.attention == "gqa" else standard_inputs(g, cfg, dt)
    attend = ATTENTION[plan.attention]
    eps = cfg.rms_eps

    x = proj.embedding(g, weights)  # (B, S, H)
    if cfg.embed_scale != 1.0:  # HF multiplies by the scale cast to the table's dtype
        x = g.op("Mul", [x, g.const(np.array(cfg.embed_scale, dt))])
    h, residual = rms_norm(g, x, norm("layers.0.attn_norm", "attn_norm", 0), eps), x
    for i in range(cfg.num_layers):
        p = f"layers.{i}"
        qkv = add(proj.linear(g, h, f"{p}.qkv", weights, ("q", "k", "v"), i),
                  bias(f"{p}.qkv.bias", ("q_bias", "k_bias", "v_bias"), i, cfg.qkv_bias))
        qkv = _qk_norm(g, cfg, qkv, norm(f"{p}.q_norm", "q_norm", i), norm(f"{p}.k_norm", "k_norm", i)) \
            if cfg.qk_norm else (qkv,)
        attn = attend(g, cfg, qkv, i, inp, *ropes[cfg.layer_rope(i)])
        attn = add(proj.linear(g, attn, f"{p}.o", weights, ("o",), i), bias(f"{p}.o.bias", ("o_bias",), i, cfg.o_bias))
        if cfg.sandwich_norms:
            attn = rms_norm(g, attn, norm(f"{p}.post_attn_norm", "post_attn_norm", i), eps)
        h, residual = skip_rms_norm(g, attn, residual, norm(f"{p}.mlp_norm", "mlp_norm", i), eps)
        gate_up = add(proj.linear(g, h, f"{p}.gate_up", weights, ("gate", "up"), i),
                      bias(f"{p}.gate_up.bias", ("gate_bias", "up_bias"), i, cfg.mlp_bias))
        act = gated_mlp_act(g, gate_up, cfg.intermediate_size, cfg.activation, dt)
        mlp = add(proj.linear(g, act, f"{p}.down", weights, ("down",), i), bias(f"{p}.down.bias", ("down_bias",), i, cfg.mlp_bias))
        if cfg.sandwich_norms:
            mlp = rms_norm(g, mlp, norm(f"{p}.post_mlp_norm", "post_mlp_norm", i), eps)
        last = i + 1 == cfg.num_layers
        next_norm = norm("norm.weight", "norm") if last else norm(f"layers.{i + 1}.attn_norm", "attn_norm", i + 1)
        h, residual = skip_rms_norm(g, mlp, residual, next_norm, eps)
        on_layer(i)

    logits = proj.lm_head(g, keep_last(g, h), weights, cfg)
    if dt != np.float32:
        logits = g.op("Cast", [logits], to=TensorProto.FLOAT)
    if cfg.final_softcap:
        logits = softcap(g, logits, cfg.final_softcap, np.dtype(np.float32))
    if g.nodes[-1].output[0] != logits:
        g.op("Cast", [logits], to=TensorProto.FLOAT, outputs=[io.LOGITS])
    else:
        g.nodes[-1].output[0] = io.LOGITS
    return _model(g, cfg, plan)


def _rope_inputs(g: GraphWriter, cfg: ModelConfig, inv_freq: np.ndarray, dt: np.dtype) -> dict:
    """RopeConfig -> (cos, sin) tables (context_length, hd/2), one pair per rope the layers use."""
    ropes = {cfg.rope: inv_freq}
    if cfg.local_rope is not None and any(cfg.window(i) for i in range(cfg.num_layers)):
        ropes.setdefault(cfg.local_rope, cfg.local_rope.inv_freq(cfg.head_dim))
    out = {}
    for n, (rope, freqs) in enumerate(ropes.items()):
        prefix = "rope" if n == 0 else "rope_local"
        out[rope] = _rope_table_nodes(g, cfg.context_length, freqs, dt, prefix)
    return out


def _rope_table_nodes(g: GraphWriter, positions: int, inv_freq: np.ndarray, dt: np.dtype, prefix: str
                      ) -> tuple[str, str]:
    """cos, sin: (positions, hd/2) tables of position x inv_freq, computed in float64 then cast,
    written as ops on constants: onnxruntime folds them into tables when the session loads, so
    the file holds hd/2 frequencies instead (Gemma 3 270M, 32,768 positions, two bases: 67 MB)."""
    f64 = lambda v: g.const(np.array(v, np.float64))  # noqa: E731
    pos = g.op("Unsqueeze", [g.op("Range", [f64(0.0), f64(float(positions)), f64(1.0)]),
                             g.const(np.array([1], np.int64))])
    angles = g.op("Mul", [pos, g.const(np.asarray(inv_freq, np.float64)[None, :], f"{prefix}.inv_freq")])
    to = _ONNX_TYPES[np.dtype(dt)]
    return (g.op("Cast", [g.op("Cos", [angles])], outputs=[f"{prefix}.cos"], to=to),
            g.op("Cast", [g.op("Sin", [angles])], outputs=[f"{prefix}.sin"], to=to))


def _qk_norm(g: GraphWriter, cfg: ModelConfig, qkv: str, q_norm: str, k_norm: str) -> tuple[str, str, str]:
    """Packed qkv -> (q, k, v) with q and k RMS-normed per head (Gemma 3, before rope)."""
    nh, kv, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    q, k, v = g.op("Split", [qkv, g.const(np.array([nh * hd, kv * hd, kv * hd], np.int64))], n_out=3, axis=-1)
    return (head_rms_norm(g, q, q_norm, nh, hd, cfg.rms_eps), head_rms_norm(g, k, k_norm, kv, hd, cfg.rms_eps), v)


def keep_last(g: GraphWriter, h: str) -> str:
    """(B, S, H) -> (B, K, H): the last K = num_logits_to_keep positions; 0 keeps all.

    A prefill only needs the last position's logits: skipping the others saves the
    (S, H) x (H, V) product and an (S, V) output. The input is onnxruntime-genai's
    num_logits_to_keep ((1,) int64; genai feeds 0), a plain input: an initializer standing
    in as its default would make ORT warn on every load."""
    starts = g.op("Neg", [io.LOGITS_TO_KEEP])
    big = g.const(np.array([np.iinfo(np.int64).max], np.int64))
    return g.op("Slice", [h, starts, big, g.const(np.array([1], np.int64))])


def lm_head(g: GraphWriter, h: str, weight_v_h: str, hidden: int, vocab: int, dtype: np.dtype) -> str:
    """(B, K, H) x (V, H)^T -> (B, K, V), the (V, H) table read transposed so a tied table is
    stored once. float32: one FusedMatMul(transB) (onnxruntime's CPU and CUDA kernels take it),
    writing the logits where the caller bound them; a Reshape after a 2-D Gemm would first
    materialize them and copy (a 512-token window of a 49k vocabulary: 100 MB more at peak).
    Other dtypes: Gemm(transB) between Reshapes, which every provider runs."""
    if np.dtype(dtype) == np.float32:
        return g.op("FusedMatMul", [h, weight_v_h], domain=MS, transB=1)
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
