"""Graph pieces for block-quantized weights (com.microsoft MatMulNBits, GatherBlockQuantized).

`g` is any graph writer with weight(name, array), const(value) and op(type, inputs, ...)
(graph_writer.GraphWriter); shapes: x (..., K) -> (..., N).
"""

from __future__ import annotations

import numpy as np

from .graph_writer import MS
from .schemes import BlockQuant


def matmul_nbits(g, x: str, bq: BlockQuant, name: str, dtype: np.dtype, accuracy_level: int,
                 out: str | None = None, block_sums: dict | None = None) -> str:
    """x @ W^T for a quantized W (N, K). Float-min schemes add blocksum(x) @ min^T.

    A float-min weight s*q + m runs as s*(q - c) + (m + c*s) with c the default zero point
    (8 or 128): codes centred on zero keep the error of MLAS' int8 activations (accuracy
    level 4) small — with c = 0 the whole offset c*s multiplies that error (SmolLM2 exact
    Q4_1 import: +1.5 % perplexity instead of +0.x %). m + c*s is one float32 rounding
    away from the source's m. `block_sums` caches blocksum(x) per (x, block).
    """
    n, k = bq.shape
    inputs = [x, g.weight(f"{name}.qweight", bq.packed()), g.weight(f"{name}.scales", bq.scales.astype(dtype))]
    zp = bq.packed_zero_points() if bq.mins is None else None
    if zp is not None:
        inputs.append(g.weight(f"{name}.zero_points", zp))
    attrs = dict(K=k, N=n, bits=bq.bits, block_size=bq.block, accuracy_level=accuracy_level)
    if bq.mins is None:
        return g.op("MatMulNBits", inputs, domain=MS, outputs=[out] if out else None, **attrs)
    y = g.op("MatMulNBits", inputs, domain=MS, **attrs)
    sums = _block_sums(g, x, k, bq.block, dtype, block_sums)  # (..., nb)
    mins = _centred_mins(bq)
    mins_t = g.weight(f"{name}.mins", np.ascontiguousarray(mins.T).astype(dtype))  # (nb, N)
    return g.op("Add", [y, g.op("MatMul", [sums, mins_t])], outputs=[out] if out else None)


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


def gather_block_quantized(g, table: BlockQuant, ids: str, name: str, dtype: np.dtype,
                           out: str | None = None) -> str:
    """Embedding lookup from a quantized (V, H) table: (B, S) int64 -> (B, S, H)."""
    v, h = table.shape
    data = table.packed_rows()  # (V, H * bits / 8)
    inputs = [g.weight(f"{name}.qweight", data), ids, g.weight(f"{name}.scales", table.scales.astype(dtype))]
    zp = table.packed_zero_points() if table.mins is None else None  # float-min: centred, as above
    if zp is not None:
        inputs.append(g.weight(f"{name}.zero_points", zp))
    attrs = dict(bits=table.bits, block_size=table.block, gather_axis=0, quantize_axis=1)
    if table.mins is None:
        return g.op("GatherBlockQuantized", inputs, domain=MS, outputs=[out] if out else None, **attrs)
    rows = g.op("GatherBlockQuantized", inputs, domain=MS, **attrs)  # (B, S, H) without the mins
    mins = g.op("Gather", [g.weight(f"{name}.mins", _centred_mins(table).astype(dtype)), ids], axis=0)  # (B, S, nb)
    # Each column gets its block's min: expand (B, S, nb) -> (B, S, H) by a column->block index.
    col_block = g.const(np.arange(h, dtype=np.int64) // table.block, "col_block")
    per_col = g.op("Gather", [mins, col_block], axis=-1)
    return g.op("Add", [rows, per_col], outputs=[out] if out else None)
