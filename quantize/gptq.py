"""GPTQ: quantize a weight column by column, pushing each column's rounding error onto the
columns not yet quantized, weighted by how the layer's inputs co-vary (Frantar et al., 2022).

For a linear layer y = W x with inputs X (tokens, K) from a calibration text, the output
error of a quantized W' is tr((W - W') H (W - W')^T) with H = X^T X. Round-to-nearest
ignores H; GPTQ minimises it greedily. Blocks of `block` columns share a scale and zero
point that are fitted (by the same least-squares search as `mse-zp`) on the block's
columns as they stand when the block is reached, i.e. after earlier corrections.
"""

from __future__ import annotations

import numpy as np

from edgellama.buildkit.schemes import BlockQuant, _with_cols, mse_float_min, mse_zero_point, rtn_symmetric

# Fraction of mean(diag(H)) added to the diagonal. H comes from a few thousand tokens of one
# kind of text; heavier damping than the paper's 0.01 generalises better to other text
# (SmolLM2 int4 block 128 on GPL-3: perplexity 36.2 at 0.01, 32.1 at 0.1; float 22.3).
DAMP = 0.1
LAZY = 128  # columns updated together (the "lazy batch" of the paper); a multiple of every block size <= 128


def gptq(w: np.ndarray, h: np.ndarray, bits: int, block: int, form: str = "zeropoint") -> BlockQuant:
    """w (N, K) float, h (K, K) = sum of x x^T over calibration inputs. form: "zeropoint"
    (uint8 zero points), "symmetric" (default zero point) or "float-min"."""
    n, k = w.shape
    if h.shape != (k, k):
        raise ValueError(f"hessian {h.shape} does not match weight {w.shape}")
    nb = -(-k // block)
    kp = nb * block
    W = np.zeros((n, kp), np.float32)
    W[:, :k] = w
    H = np.eye(kp, dtype=np.float64)
    H[:k, :k] = h
    diag = np.diag(H)[:k]
    dead = diag <= 0  # inputs never active in the calibration text: plain rounding there
    H[np.arange(k)[dead], np.arange(k)[dead]] = 1.0
    H[np.arange(kp), np.arange(kp)] += DAMP * float(np.mean(np.diag(H)[:k]))
    U = _upper_cholesky_of_inverse(H).astype(np.float32)

    levels = (1 << bits) - 1
    q = np.zeros((n, nb, block), np.uint8)
    scales = np.zeros((n, nb), np.float32)
    zeros = np.zeros((n, nb), np.uint8) if form == "zeropoint" else None
    mins = np.zeros((n, nb), np.float32) if form == "float-min" else None
    lazy = max(LAZY, block)
    for i1 in range(0, kp, lazy):
        i2 = min(i1 + lazy, kp)
        W1 = W[:, i1:i2].copy()
        U1 = U[i1:i2, i1:i2]
        E1 = np.zeros_like(W1)
        for i in range(i2 - i1):
            col = i1 + i
            b, j = divmod(col, block)
            if j == 0:  # fit this block's grid on its columns as corrected so far
                real = min(block, k - col)
                s, z, m = _fit(W1[:, i:i + real].astype(np.float32), bits, block, form)
                scales[:, b] = s
                if zeros is not None:
                    zeros[:, b] = z
                if mins is not None:
                    mins[:, b] = m
                inv = np.divide(1.0, s, out=np.zeros_like(s), where=s != 0)
            x = W1[:, i]
            code = np.clip(np.rint((x - m) * inv) + z, 0, levels)
            q[:, b, j] = code
            err = (x - (s * (code - z) + m)) / U1[i, i]
            W1[:, i:] -= np.outer(err, U1[i, i:])
            E1[:, i] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    return _with_cols(BlockQuant(bits, block, q, scales, mins, 0, zeros), k)


def _upper_cholesky_of_inverse(h: np.ndarray) -> np.ndarray:
    """U with inv(H) = U^T U (upper triangular), adding damping until H is positive definite."""
    damp = DAMP * float(np.mean(np.diag(h)))
    for _ in range(8):
        try:
            hinv = np.linalg.inv(np.linalg.cholesky(h))  # L^-1, so inv(H) = L^-T L^-1
            hinv = hinv.T @ hinv
            return np.linalg.cholesky(hinv).T
        except np.linalg.LinAlgError:
            h = h + damp * np.eye(len(h))
            damp *= 10
    raise np.linalg.LinAlgError("calibration statistics are not positive definite even with damping")


def _fit(cols: np.ndarray, bits: int, block: int, form: str):
    """(scale, zero, min) per row for one block of columns, by the matching scheme's search."""
    fit = {"zeropoint": mse_zero_point, "symmetric": rtn_symmetric, "float-min": mse_float_min}[form]
    bq = fit(cols, bits, block)
    s = bq.scales[:, 0].astype(np.float32)
    if form == "zeropoint":
        return s, bq.zeros[:, 0].astype(np.float32), np.zeros_like(s)
    if form == "symmetric":
        return s, np.full_like(s, 1 << (bits - 1)), np.zeros_like(s)
    return s, np.zeros_like(s), bq.mins[:, 0].astype(np.float32)
