"""GGUF quant blocks -> BlockQuant, exactly: no dequantize-then-requantize.

Layouts (ggml-common.h; the unpacking follows gguf-py's quants.py, the reference), along a row:
  Q4_0  32: d f16 | qs 16 B        w[j] = d * (q[j] - 8)          q: nibbles, low half first
  Q4_1  32: d f16 | m f16 | qs 16 B w[j] = d * q[j] + m
  Q5_0  32: d f16 | qh 4 B | qs 16 B w[j] = d * (q[j] - 16)       q = nibble | bit j of qh << 4
  Q8_0  32: d f16 | qs 32 x int8   w[j] = d * qs[j]
  Q4_K 256: d f16 | dmin f16 | 12 B of 6-bit (sc, m) x 8 | qs 128 B
            sub-block b of 32: w = (d * sc[b]) * q - (dmin * m[b]),  q: 4 bits
  Q6_K 256: ql 128 B | qh 64 B | sc 16 x int8 | d f16
            sub-block b of 16: w = (d * sc[b]) * (q - 32),          q: 6 bits
Each maps to MatMulNBits' own form (codes, scale[, min]) with the same numbers: a product of an
f16 and a 6- or 8-bit integer is exact in float32, so the kernel computes with the GGUF's values.
Q4_K is the float-min form at 4 bits (block 32); Q5_0 and Q6_K fit the symmetric 8-bit form
(blocks 32 and 16) with their codes moved up to the 128 centre.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from .schemes import BlockQuant


def _f16(b: np.ndarray) -> np.ndarray:
    """(..., 2) bytes -> (...) float32."""
    return b.copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(..., 16) bytes -> (..., 32) codes: low nibbles are elements 0-15, high 16-31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _q4_0(blocks: np.ndarray) -> BlockQuant:  # blocks: (rows, cols/32, 18)
    return BlockQuant(4, 32, _nibbles(blocks[..., 2:18]), _f16(blocks[..., 0:2]))


def _q4_1(blocks: np.ndarray) -> BlockQuant:  # (rows, cols/32, 20)
    return BlockQuant(4, 32, _nibbles(blocks[..., 4:20]), _f16(blocks[..., 0:2]), _f16(blocks[..., 2:4]))


def _q8_0(blocks: np.ndarray) -> BlockQuant:  # (rows, cols/32, 34)
    q = blocks[..., 2:34].copy().view(np.int8).astype(np.int16) + 128
    return BlockQuant(8, 32, q.astype(np.uint8), _f16(blocks[..., 0:2]))


def _q5_0(blocks: np.ndarray) -> BlockQuant:  # (rows, cols/32, 22)
    qh = blocks[..., 2:6].copy().view("<u4")  # (rows, nb, 1): bit j is element j's fifth bit
    high = ((qh >> np.arange(32, dtype=np.uint32)) & 1).astype(np.uint8)  # (rows, nb, 32)
    q = _nibbles(blocks[..., 6:22]) | (high << 4)  # 0..31, value d * (q - 16)
    return BlockQuant(8, 32, q + np.uint8(128 - 16), _f16(blocks[..., 0:2]))


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 12) bytes -> sc, m (..., 8): six bits each (gguf-py Q4_K.get_scale_min)."""
    d, m, m_d = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([d & 0x3F, (m_d & 0x0F) | ((d >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([m & 0x3F, (m_d >> 4) | ((m >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(blocks: np.ndarray) -> BlockQuant:  # (rows, cols/256, 144)
    rows, nsb = blocks.shape[:2]
    d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]  # (rows, nsb, 1)
    sc, mn = _q4_k_scales(blocks[..., 4:16])  # (rows, nsb, 8)
    qs = blocks[..., 16:144].reshape(rows, nsb, 4, 32)  # 32 bytes carry sub-blocks 2c (low) and 2c+1 (high)
    q = np.stack([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nsb * 8, 32)
    scales = (d * sc.astype(np.float32)).reshape(rows, nsb * 8)
    mins = -(dmin * mn.astype(np.float32)).reshape(rows, nsb * 8)
    return BlockQuant(4, 32, q, scales, mins)


def _q6_k(blocks: np.ndarray) -> BlockQuant:  # (rows, cols/256, 210)
    rows, nsb = blocks.shape[:2]
    ql = blocks[..., 0:128].reshape(rows, nsb, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(2, 1)
    qh = blocks[..., 128:192].reshape(rows, nsb, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(4, 1)
    ql = (ql & 0x0F).reshape(rows, nsb, 8, 32)
    qh = (qh & 0x03).reshape(rows, nsb, 8, 32)
    q = (ql | (qh << 4)).reshape(rows, nsb * 16, 16)  # 0..63, value (d * sc) * (q - 32)
    sc = blocks[..., 192:208].copy().view(np.int8).astype(np.float32)  # (rows, nsb, 16)
    scales = (_f16(blocks[..., 208:210])[..., None] * sc).reshape(rows, nsb * 16)
    return BlockQuant(8, 16, q + np.uint8(128 - 32), scales)


# GGUF type -> (weights per block, bytes per block, decoder of (rows, blocks, bytes) -> BlockQuant)
GGUF_BLOCKS: dict[str, tuple[int, int, Callable[[np.ndarray], BlockQuant]]] = {
    "Q4_0": (32, 18, _q4_0),
    "Q4_1": (32, 20, _q4_1),
    "Q5_0": (32, 22, _q5_0),
    "Q8_0": (32, 34, _q8_0),
    "Q4_K": (256, 144, _q4_k),
    "Q6_K": (256, 210, _q6_k),
}
GGUF_NATIVE = tuple(GGUF_BLOCKS)


def from_gguf(type_name: str, raw: np.ndarray, shape: tuple[int, int]) -> BlockQuant:
    """raw: the tensor's bytes; shape: (rows, cols) in numpy order."""
    if type_name not in GGUF_BLOCKS:
        raise ValueError(f"{type_name} has no exact block form here; supported: {', '.join(GGUF_NATIVE)}")
    per_block, nbytes, decode = GGUF_BLOCKS[type_name]
    rows, cols = shape
    return decode(np.asarray(raw, np.uint8).reshape(rows, cols // per_block, nbytes))
