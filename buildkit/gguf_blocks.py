"""GGUF quant blocks -> BlockQuant, exactly: no dequantize-then-requantize.

Layouts (ggml-common.h), one block of 32 weights along a row:
  Q4_0  d: f16 | qs: 16 bytes   w[j] = d * (qs[j] & 15) - 8 d,  w[j+16] = d * (qs[j] >> 4) - 8 d
  Q4_1  d: f16 | m: f16 | qs: 16 bytes   w[j] = d * nibble + m   (same nibble order)
  Q8_0  d: f16 | qs: 32 x int8           w[j] = d * qs[j]
Each maps to MatMulNBits' own form (codes, scale[, min]) with the same numbers, so the
kernel computes with the GGUF's values.
"""

from __future__ import annotations

import numpy as np

from .schemes import BlockQuant

GGUF_NATIVE = ("Q4_0", "Q4_1", "Q8_0")


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockQuant:
    """raw: the tensor's bytes; shape: (rows, cols) in numpy order."""
    rows, cols = shape
    blocks = raw.reshape(rows, cols // 32, -1)
    d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float32)
    if type_name == "Q4_0":
        return BlockQuant(4, 32, _nibbles(blocks[..., 2:18]), d)
    if type_name == "Q4_1":
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float32)
        return BlockQuant(4, 32, _nibbles(blocks[..., 4:20]), d, m)
    if type_name == "Q8_0":
        q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
        return BlockQuant(8, 32, q.astype(np.uint8), d)
    raise ValueError(f"{type_name} has no exact block form here; supported: {', '.join(GGUF_NATIVE)}")
