"""Graph pieces for block-quantized weights (com.microsoft MatMulNBits, GatherBlockQuantized).

`g` is any graph writer with weight(name, array), const(value) and op(type, inputs, ...)
(graph_writer.GraphWriter); shapes: x (..., K) -> (..., N).

A weight is written once (`write_weight`) and read by any number of nodes: a tied
vocabulary table feeds both the embedding GatherBlockQuantized (through a Reshape of the
MatMulNBits codes, as onnxruntime-genai's shared embeddings do) and the lm_head MatMulNBits.
Float32 scales and mins that are exact in float16 (every GGUF block's are) are stored as
float16 behind a Cast: onnxruntime folds the Cast into a float32 initializer when the session
is created, before MatMulNBits prepacks its weight, so the file is smaller and the graph that
runs is the same.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from onnx import TensorProto

from .graph_writer import MS
from .schemes import BlockQuant


class QuantWeight(NamedTuple):
    """A BlockQuant's initializers (names of graph values) once written."""

    bq: BlockQuant
    qweight: str  # (N, nb, block*bits/8) uint8, as MatMulNBits reads B
    scales: str  # (N, nb)
    zero_points: str | None  # packed uint8 zero points; None: the default zero point
    mins: str | None  # (N, nb) float-min offsets against the default zero point (see matmul_nbits)


def write_weight(g, bq: BlockQuant, name: str, dtype: np.dtype) -> QuantWeight:
    """Store a quantized weight once; see the module docstring for the float16 storage."""
    qweight = g.weight(f"{name}.qweight", bq.packed())
    scales = _float_weight(g, f"{name}.scales", bq.scales, dtype)
    zp = bq.packed_zero_points() if bq.mins is None else None
    zero_points = g.weight(f"{name}.zero_points", zp) if zp is not None else None
    mins = None
    if bq.mins is not None:
        centre = np.float32(1 << (bq.bits - 1))
        if np.dtype(dtype) == np.float32 and _exact_in_half(bq.mins):
            # m + c*s computed in the graph from the stored float16 values: the same float32
            # arithmetic as _centred_mins, folded once at load.
            raw = _float_weight(g, f"{name}.mins", bq.mins, dtype)
            mins = g.op("Add", [raw, g.op("Mul", [scales, g.const(centre, "centre")])], outputs=[f"{name}.mins.centred"])
        else:
            mins = g.weight(f"{name}.mins", _centred_mins(bq).astype(dtype))
    return QuantWeight(bq, qweight, scales, zero_points, mins)


def matmul_nbits(g, x: str, w: BlockQuant | QuantWeight, name: str, dtype: np.dtype, accuracy_level: int,
                 out: str | None = None, block_sums: dict | None = None) -> str:
    """x @ W^T for a quantized W (N, K). Float-min schemes add blocksum(x) @ min^T.

    A float-min weight s*q + m runs as s*(q - c) + (m + c*s) with c the default zero point
    (8 or 128): codes centred on zero keep the error of MLAS' int8 activations (accuracy
    level 4) small — with c = 0 the whole offset c*s multiplies that error (SmolLM2 exact
    Q4_1 import: +1.5 % perplexity instead of +0.x %). m + c*s is one float32 rounding
    away from the source's m. `block_sums` caches blocksum(x) per (x, block).
    """
    w = w if isinstance(w, QuantWeight) else write_weight(g, w, name, dtype)
    bq = w.bq
    n, k = bq.shape
    inputs = [x, w.qweight, w.scales] + ([w.zero_points] if w.zero_points else [])
    attrs = dict(K=k, N=n, bits=bq.bits, block_size=bq.block, accuracy_level=accuracy_level)
    if w.mins is None:
        return g.op("MatMulNBits", inputs, domain=MS, outputs=[out] if out else None, **attrs)
    y = g.op("MatMulNBits", inputs, domain=MS, **attrs)
    sums = _block_sums(g, x, k, bq.block, dtype, block_sums)  # (..., nb)
    mins_t = g.op("Transpose", [w.mins], perm=[1, 0])  # (nb, N), folded at load
    return g.op("Add", [y, g.op("MatMul", [sums, mins_t])], outputs=[out] if out else None)


def gather_block_quantized(g, table: BlockQuant | QuantWeight, ids: str, name: str, dtype: np.dtype,
                           out: str | None = None) -> str:
    """Embedding lookup from a quantized (V, H) table: (B, S) int64 -> (B, S, H). The codes
    are MatMulNBits' (V, nb, blob) viewed as (V, nb * blob) rows, so a table also read by an
    lm_head is stored once; a padded last block is sliced off."""
    w = table if isinstance(table, QuantWeight) else write_weight(g, table, name, dtype)
    bq = w.bq
    v, h = bq.shape
    nb = bq.q.shape[1]
    rows = g.op("Reshape", [w.qweight, g.const(np.array([v, nb * bq.block * bq.bits // 8], np.int64), "table_rows")])
    inputs = [rows, ids, w.scales] + ([w.zero_points] if w.zero_points else [])
    attrs = dict(bits=bq.bits, block_size=bq.block, gather_axis=0, quantize_axis=1)
    padded = nb * bq.block != h
    if w.mins is None and not padded:
        return g.op("GatherBlockQuantized", inputs, domain=MS, outputs=[out] if out else None, **attrs)
    y = g.op("GatherBlockQuantized", inputs, domain=MS, **attrs)  # (B, S, nb*block), without the mins
    if padded:
        y = g.op("Slice", [y, g.const(np.array([0], np.int64)), g.const(np.array([h], np.int64)),
                           g.const(np.array([-1], np.int64))], outputs=[out] if out and w.mins is None else None)
    if w.mins is None:
        return y
    mins = g.op("Gather", [w.mins, ids], axis=0)  # (B, S, nb), centred as in matmul_nbits
    # Each column gets its block's min: expand (B, S, nb) -> (B, S, H) by a column->block index.
    col_block = g.const(np.arange(h, dtype=np.int64) // bq.block, "col_block")
    per_col = g.op("Gather", [mins, col_block], axis=-1)
    return g.op("Add", [y, per_col], outputs=[out] if out else None)


def _float_weight(g, name: str, values: np.ndarray, dtype: np.dtype) -> str:
    """A float initializer in the graph's dtype; float32 values exact in float16 are stored as
    float16 behind a Cast (half the bytes on disk, folded to float32 at load)."""
    if np.dtype(dtype) == np.float32 and _exact_in_half(values):
        return g.op("Cast", [g.weight(f"{name}.f16", values.astype(np.float16))], to=TensorProto.FLOAT)
    return g.weight(name, np.asarray(values).astype(dtype))


def _exact_in_half(values: np.ndarray) -> bool:
    v = np.asarray(values, np.float32)
    with np.errstate(over="ignore"):
        half = v.astype(np.float16)
    return bool(np.isfinite(half).all() and np.array_equal(half.astype(np.float32), v))


def _centred_mins(bq: BlockQuant) -> np.ndarray:
    """(N, nb) m + c*s: the float-min offsets for codes read against the default zero point c."""
    centre = 1 << (bq.bits - 1)
    return (bq.mins.astype(np.float32) + np.float32(centre) * bq.scales.astype(np.float32)).astype(np.float32)


def _block_sums(g, x: str, k: int, block: int, dtype: np.dtype, cache: dict | None) -> str:
    """(..., K) -> (..., ceil(K/block)): x @ I where I[k, b] = 1 if column k is in block b.
    Rank-agnostic, and a partial last block simply sums fewer columns."""
    cache = {} if cache is None else cache
    if (x, block) not in cache:
        key = ("indicator", k, block, np.dtype(dtype).str)
        if key not in cache:  # one constant per (K, block), shared by every layer
            nb = -(-k // block)
            ind = (np.arange(k)[:, None] // block == np.arange(nb)[None, :]).astype(dtype)
            cache[key] = g.weight(g.fresh(f"block_indicator_{k}_{block}"), ind)
        cache[(x, block)] = g.op("MatMul", [x, cache[key]])
    return cache[(x, block)]
