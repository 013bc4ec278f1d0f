"""Block quantization schemes for ONNX Runtime's MatMulNBits / GatherBlockQuantized.

A weight W (N, K) — N outputs, K inputs, checkpoint layout — is cut into blocks of
`block` along K. Every scheme returns a `BlockQuant`:

    symmetric   W[n, k] = scale[n, b] * (q[n, k] - 2^(bits-1))           (default zero point)
    zero-point  W[n, k] = scale[n, b] * (q[n, k] - zero[n, b])           (uint8 zero points)
    float-min   W[n, k] = scale[n, b] * q[n, k] + min[n, b]              (zero point 0)

The float-min form is llama.cpp's Q4_1 / Q4_K grid. MatMulNBits runs it exactly and on
its fast path (uint8 zero points of 0, never float zero points, which are ~100x slower on
CPU); the min term is added as blocksum(x) @ min^T, a (K/block x N) product — two more
ops per projection, which a small model feels (SmolLM2-135M int4: 7.9 vs 5.7 ms a token).
The zero-point form has no extra ops; its least-squares search gets most of the accuracy.

Each scheme is one small class registered in SCHEMES by name; `quantize` returns the
quantized weight, and `BlockQuant.error(w)` measures what it cost.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from functools import wraps
from typing import Callable

import numpy as np

from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.workers import Workers, shared

BLOCK_SIZES = (16, 32, 64, 128, 256)
BITS = (4, 8)


@dataclass(frozen=True)
class BlockQuant:
    bits: int
    block: int
    q: np.ndarray  # (N, nb, block) uint8 codes in [0, 2^bits); nb = ceil(K / block)
    scales: np.ndarray  # (N, nb) float32
    mins: np.ndarray | None = None  # (N, nb) float32 for float-min schemes
    cols: int = 0  # K; the last block is padded when block does not divide K (0: no padding)
    zeros: np.ndarray | None = None  # (N, nb) uint8 integer zero points (zero-point form)

    @property
    def shape(self) -> tuple[int, int]:
        n, nb, bs = self.q.shape
        return n, self.cols or nb * bs

    @property
    def zero(self) -> int | np.ndarray:
        """The zero point: a scalar, or (N, nb, 1) per block."""
        if self.zeros is not None:
            return self.zeros[..., None].astype(np.int32)
        return 0 if self.mins is not None else 1 << (self.bits - 1)

    def dequantize(self) -> np.ndarray:
        """(N, K) float32, computed the way the kernels do: scale * (q - zero) [+ min]."""
        w = (self.q.astype(np.float32) - self.zero) * self.scales[..., None]
        if self.mins is not None:
            w = w + self.mins[..., None]
        return w.reshape(len(w), -1)[:, : self.shape[1]]

    def error(self, w: np.ndarray) -> float:
        """Relative Frobenius error ||W - deq(Q(W))|| / ||W||, a slice of rows at a time (a
        262k-row vocabulary table dequantized whole would hold several copies of itself)."""
        n, k = w.shape
        step = _slice_rows(k)
        diff = total = 0.0
        for r in range(0, n, step):
            part = w[r:r + step].astype(np.float64)
            d = self.rows(slice(r, r + step)).dequantize() - part
            diff += float(np.einsum("ij,ij->", d, d))
            total += float(np.einsum("ij,ij->", part, part))
        return float(np.sqrt(diff) / max(np.sqrt(total), 1e-30))

    def packed(self) -> np.ndarray:
        """(N, K/block, block*bits/8) uint8 as MatMulNBits wants B: low nibble first."""
        if self.bits == 8:
            return np.ascontiguousarray(self.q)
        return (self.q[..., 0::2] | (self.q[..., 1::2] << 4)).astype(np.uint8)

    def packed_rows(self) -> np.ndarray:
        """(N, K*bits/8) uint8: unpadded rows, as GatherBlockQuantized wants its data."""
        n, k = self.shape
        q = self.q.reshape(n, -1)[:, :k]
        return q if self.bits == 8 else (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)

    def packed_zero_points(self) -> np.ndarray | None:
        """(N, ceil(nb*bits/8)) uint8, low nibble first; None = the default zero point."""
        if self.zeros is None and self.mins is None:
            return None
        n, nb, _ = self.q.shape
        z = self.zeros if self.zeros is not None else np.zeros((n, nb), np.uint8)
        if self.bits == 8:
            return np.ascontiguousarray(z, np.uint8)
        z = np.pad(z, ((0, 0), (0, nb % 2)))
        return (z[:, 0::2] | (z[:, 1::2] << 4)).astype(np.uint8)

    def with_half_scales(self) -> "BlockQuant":
        """Scales and mins rounded to float16, codes kept: each value moves by at most
        ~0.4 % of a quantization step, and the weight is stored with 2-byte scales
        (buildkit.quant_nodes; GGUF blocks are float16 already and do not move)."""
        half = lambda a: None if a is None else np.clip(a, -65504, 65504).astype(np.float16).astype(np.float32)  # noqa: E731
        return replace(self, scales=half(self.scales), mins=half(self.mins))

    def rows(self, index) -> "BlockQuant":
        """A subset or permutation of output rows."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return replace(self, q=self.q[index], scales=self.scales[index], mins=pick(self.mins), zeros=pick(self.zeros))

    def widened(self, bits: int, block: int) -> "BlockQuant":
        """The same values at more bits and/or a smaller block, e.g. to concatenate: exact,
        but for a float min shifted with the codes (one float32 rounding)."""
        out = self
        if block < out.block:
            split = out.block // block
            n, nb, _ = out.q.shape
            rep = lambda a: None if a is None else np.repeat(a, split, axis=1)  # noqa: E731
            out = BlockQuant(out.bits, block, out.q.reshape(n, nb * split, block), rep(out.scales), rep(out.mins),
                             out.cols, rep(out.zeros))
        if bits > out.bits:
            # Centre the codes in the wider range (zero points and mins move with them): the
            # kernels read codes against the centre, and uncentred codes multiply the error
            # of int8 activations (a 4->8-bit Q4_1 import went to perplexity 37,464).
            shift = (1 << (bits - 1)) - (1 << (out.bits - 1))
            zeros = None if out.zeros is None else (out.zeros.astype(np.int32) + shift).astype(np.uint8)
            mins = None if out.mins is None else (out.mins - np.float32(shift) * out.scales).astype(np.float32)
            out = replace(out, bits=bits, q=(out.q.astype(np.int32) + shift).astype(np.uint8), zeros=zeros, mins=mins)
        return out


def concat_rows(parts: list[BlockQuant]) -> BlockQuant:
    """Stack output rows of several weights (q, k, v -> qkv) at a common bits/block/form."""
    bits, block = max(p.bits for p in parts), min(p.block for p in parts)
    parts = [p.widened(bits, block) for p in parts]
    if any(p.mins is not None for p in parts):  # mixed forms: the most general one serves all
        parts = [_as_float_min(p) for p in parts]
    elif any(p.zeros is not None for p in parts):
        parts = [_with_zeros(p) for p in parts]
    cat = lambda attr: None if getattr(parts[0], attr) is None else np.concatenate([getattr(p, attr) for p in parts])  # noqa: E731
    return BlockQuant(bits, block, cat("q"), cat("scales"), cat("mins"), parts[0].cols, cat("zeros"))


def _as_float_min(p: BlockQuant) -> BlockQuant:
    """s * (q - z) == s * q + (-z * s): the same values with zero point 0 and a float min."""
    if p.mins is not None:
        return p
    zero = p.zero[..., 0] if isinstance(p.zero, np.ndarray) else p.zero
    return replace(p, mins=(-zero * p.scales).astype(np.float32), zeros=None)


def _with_zeros(p: BlockQuant) -> BlockQuant:
    if p.zeros is not None:
        return p
    return replace(p, zeros=np.full(p.scales.shape, p.zero, np.uint8))


# ---- schemes ------------------------------------------------------------------------------

def _blocks(w: np.ndarray, block: int) -> np.ndarray:
    """(N, K) -> (N, ceil(K/block), block) float32. A partial last block is padded by
    repeating its last value, which changes neither its range nor its best fit much."""
    n, k = w.shape
    if block not in BLOCK_SIZES:
        raise BadArgumentError(f"block size {block} is not supported; choose one of {', '.join(map(str, BLOCK_SIZES))}")
    if k % 2:
        raise BadArgumentError(f"input size {k} is odd; 4-bit packing needs an even number of columns")
    w = np.asarray(w, np.float32)
    if k % block:
        w = np.pad(w, ((0, 0), (0, -k % block)), mode="edge")
    return w.reshape(n, -1, block)


def _with_cols(bq: BlockQuant, k: int) -> BlockQuant:
    return bq if bq.q.shape[1] * bq.block == k else replace(bq, cols=k)


# A large weight is fitted a slice of rows at a time, the slices shared among threads. Every
# fit treats each block of each row on its own (elementwise arithmetic, sums along the block),
# so the result is the same, bit for bit, as fitting the whole at once; but each slice's
# temporaries stay in cache (SmolLM2's 49152 x 576 table: about 2x faster on one core) and
# memory holds a few slices' worth of them instead of a dozen copies of the whole weight.
_SLICE = 1 << 17  # elements of a weight fitted together (~0.5 MB of float32 per temporary)


def _slice_rows(k: int) -> int:
    """Rows of a weight `k` wide that make one slice."""
    return max(1, _SLICE // max(int(k), 1))


def _workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


def _fit_pool() -> Workers:
    return shared("edgellama-fit", _workers())


def _by_rows(fit):
    """Run fit(w, bits, block, ...) on slices of w's rows (on the fit threads when there are
    several slices and more than one core) and stack the slices' results."""

    @wraps(fit)
    def sliced(w: np.ndarray, bits: int, block: int, *args, **kwargs) -> BlockQuant:
        n, k = w.shape
        rows = _slice_rows(k)
        if n <= rows:
            return fit(w, bits, block, *args, **kwargs)
        spans = [(i, min(i + rows, n)) for i in range(0, n, rows)]
        one = lambda span: fit(w[span[0]:span[1]], bits, block, *args, **kwargs)  # noqa: E731
        pool = _fit_pool() if _workers() > 1 else None
        if pool is not None and not pool.on_worker:
            parts = pool.map(one, spans)
        else:
            parts = [one(span) for span in spans]
        cat = lambda attr: None if getattr(parts[0], attr) is None else np.concatenate([getattr(p, attr) for p in parts])  # noqa: E731
        return replace(parts[0], q=cat("q"), scales=cat("scales"), mins=cat("mins"), zeros=cat("zeros"))

    return sliced


@_by_rows
def rtn_symmetric(w: np.ndarray, bits: int, block: int) -> BlockQuant:
    """Round to nearest, zero at 2^(bits-1); the largest-magnitude value maps to -2^(bits-1)
    exactly (llama.cpp's Q4_0 / Q8_0 choice, one more level than absmax / (2^(bits-1) - 1))."""
    x = _blocks(w, block)
    half = 1 << (bits - 1)
    idx = np.abs(x).argmax(-1)[..., None]
    extreme = np.take_along_axis(x, idx, -1)[..., 0]  # signed value of largest |x|
    scale = (extreme / -half if bits == 4 else np.abs(extreme) / (half - 1)).astype(np.float32)
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.clip(np.rint(x * inv[..., None]) + half, 0, 2 * half - 1).astype(np.uint8)
    return BlockQuant(bits, block, q, scale)


@_by_rows
def rtn_float_min(w: np.ndarray, bits: int, block: int) -> BlockQuant:
    """Round to nearest on [min, max] of each block: scale = (max - min) / (2^bits - 1)."""
    x = _blocks(w, block)
    lo, hi = x.min(-1), x.max(-1)
    scale = ((hi - lo) / ((1 << bits) - 1)).astype(np.float32)
    return _fit_codes(x, bits, scale, lo.astype(np.float32))


def _fit_codes(x: np.ndarray, bits: int, scale: np.ndarray, lo: np.ndarray) -> BlockQuant:
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    q = np.clip(np.rint((x - lo[..., None]) * inv[..., None]), 0, (1 << bits) - 1).astype(np.uint8)
    return BlockQuant(bits, x.shape[-1], q, scale, lo)


@_by_rows
def mse_float_min(w: np.ndarray, bits: int, block: int, importance: np.ndarray | None = None) -> BlockQuant:
    """Least-squares (scale, min) per block: from the symmetric grid and several clipped
    ranges, alternate rounding the codes and solving the 2x2 normal equations for scale
    and min; keep the best fit of each block. Recovers weights that already lie on a
    Q4_0 / Q4_1 / Q8_0 grid exactly."""
    def refine(x, valid, scale, m):
        cand = _fit_codes(x, bits, scale, m)
        return _least_squares(x, cand.q.astype(np.float32), valid, scale, m)

    # The symmetric grid in float-min form (min = -zero * scale) keeps Q4_0 / Q8_0 blocks exact.
    start = _as_float_min(rtn_symmetric(w, bits, block))
    return _search(w, bits, block, start, refine, lambda x, scale, m: _fit_codes(x, bits, scale, m), importance)


@_by_rows
def mse_zero_point(w: np.ndarray, bits: int, block: int, importance: np.ndarray | None = None) -> BlockQuant:
    """Least squares with integer zero points (MatMulNBits' uint8 zero points, no extra ops):
    fit (scale, min) as in mse_float_min, round the zero point -min/scale to an integer, refit
    the scale for that zero point; keep the best fit of each block, the symmetric grid included."""
    def refine(x, valid, scale, m):
        cand = _zero_point_codes(x, bits, scale, m)
        q = cand.q.astype(np.float32) - cand.zeros[..., None]
        den = (q * q * valid).sum(-1)
        scale = np.where(den > 0, (q * x * valid).sum(-1) / np.where(den > 0, den, 1), scale).astype(np.float32)
        m = (-cand.zeros * scale).astype(np.float32)
        return _least_squares(x, cand.q.astype(np.float32), valid, scale, m)

    start = _with_zeros(rtn_symmetric(w, bits, block))
    return _search(w, bits, block, start, refine, lambda x, scale, m: _zero_point_codes(x, bits, scale, m), importance)


def _search(w: np.ndarray, bits: int, block: int, best: BlockQuant, refine, codes, importance=None,
            shrinks=(1.0, 0.95, 0.9, 0.85, 0.8, 0.75), iters: int = 4) -> BlockQuant:
    """Per block, the best of `best` and a fit refined from each clipped [min, max] range.
    `importance` (K,) weighs each input column's squared error (e.g. the mean square of the
    activations it multiplies); None weighs them equally."""
    x = _blocks(w, block)
    valid = (np.arange(x.shape[1] * block) < w.shape[1]).astype(np.float32)  # padded tail: 0
    if importance is not None:
        imp = np.asarray(importance, np.float64)
        imp = imp / max(float(imp.mean()), 1e-30)
        valid[: w.shape[1]] *= imp.astype(np.float32)
    valid = valid.reshape(1, -1, block)
    lo, hi = x.min(-1), x.max(-1)
    levels = (1 << bits) - 1
    best_err = _block_sq_error(best, x, valid)
    for s in shrinks:
        mid, half = (lo + hi) / 2, (hi - lo) * s / 2
        scale, m = (2 * half / levels).astype(np.float32), (mid - half).astype(np.float32)
        for _ in range(iters):
            scale, m = refine(x, valid, scale, m)
        cand = codes(x, scale, m)
        err = _block_sq_error(cand, x, valid)
        better = err < best_err
        best = _pick(better, cand, best)
        best_err = np.where(better, err, best_err)
    return best


def _zero_point_codes(x: np.ndarray, bits: int, scale: np.ndarray, m: np.ndarray) -> BlockQuant:
    levels = (1 << bits) - 1
    inv = np.divide(1.0, scale, out=np.zeros_like(scale), where=scale != 0)
    zeros = np.clip(np.rint(-m * inv), 0, levels)
    q = np.clip(np.rint(x * inv[..., None]) + zeros[..., None], 0, levels).astype(np.uint8)
    return BlockQuant(bits, x.shape[-1], q, scale.astype(np.float32), None, 0, zeros.astype(np.uint8))


def _block_sq_error(bq: BlockQuant, x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """(N, nb) squared error of each block over its real (unpadded) columns."""
    w = (bq.q.astype(np.float32) - bq.zero) * bq.scales[..., None]
    if bq.mins is not None:
        w = w + bq.mins[..., None]
    return (((w - x) ** 2) * valid).sum(-1)


def _least_squares(x: np.ndarray, q: np.ndarray, valid: np.ndarray, scale: np.ndarray, m: np.ndarray):
    """argmin over (s, m) of sum v (s*q + m - x)^2 over each block's columns, v the column
    weights (0 on padding); keeps the old fit where the system is singular."""
    n = valid.sum(-1)
    vq = q * valid
    sq, sqq, sx, sqx = vq.sum(-1), (vq * q).sum(-1), (x * valid).sum(-1), (vq * x).sum(-1)
    det = n * sqq - sq * sq
    ok = det > 1e-12
    safe = np.where(ok, det, 1.0)
    new_s = np.where(ok, (n * sqx - sq * sx) / safe, scale)
    new_m = np.where(ok, (sx - new_s * sq) / n, m)
    return new_s.astype(np.float32), new_m.astype(np.float32)


def _pick(mask: np.ndarray, a: BlockQuant, b: BlockQuant) -> BlockQuant:
    """Per block: a where mask, else b (same form)."""
    either = lambda x, y: None if x is None else np.where(mask, x, y)  # noqa: E731
    return BlockQuant(a.bits, a.block, np.where(mask[..., None], a.q, b.q), np.where(mask, a.scales, b.scales),
                      either(a.mins, b.mins), 0, either(a.zeros, b.zeros))


# name -> (description, quantize(w, bits, block) -> BlockQuant)
SCHEMES: dict[str, tuple[str, Callable[[np.ndarray, int, int], BlockQuant]]] = {
    "rtn-symmetric": ("round to nearest, symmetric (Q4_0 / Q8_0 style)", rtn_symmetric),
    "rtn-asymmetric": ("round to nearest on each block's [min, max] (Q4_1 style)", rtn_float_min),
    "mse-asymmetric": ("least-squares scale and float min per block (Q4_K style search); exact on "
                       "Q4_0/Q4_1/Q8_0 grids; two more ops per projection", mse_float_min),
    "mse-zeropoint": ("least-squares scale and integer zero point per block; no extra ops", mse_zero_point),
    # GPTQ (quantize/gptq.py) needs calibration statistics; these are its grids and what a
    # weight without statistics (an embedding table) gets instead.
    "gptq-zeropoint": ("GPTQ on a calibration text, integer zero points (mse-zp grid per block); "
                       "no extra ops", mse_zero_point),
    "gptq-symmetric": ("GPTQ on a calibration text, symmetric grid", rtn_symmetric),
}
METHODS = ("rtn", "mse", "mse-zp", "gptq")
# the grid GPTQ fits per block, by scheme
GPTQ_FORMS = {"gptq-zeropoint": "zeropoint", "gptq-symmetric": "symmetric", "mse-zeropoint": "zeropoint",
              "rtn-symmetric": "symmetric", "mse-asymmetric": "float-min", "rtn-asymmetric": "float-min"}


def scheme_name(method: str, symmetric: bool) -> str:
    """rtn / mse with --symmetric or --asymmetric (float min); mse-zp: asymmetric with
    integer zero points; gptq: integer zero points, or --symmetric."""
    if method in ("mse-zp", "gptq") and not symmetric:
        name = "mse-zeropoint" if method == "mse-zp" else "gptq-zeropoint"
    else:
        name = f"{method}-{'symmetric' if symmetric else 'asymmetric'}"
    if name not in SCHEMES:
        raise BadArgumentError(f"method {method!r} with {'--symmetric' if symmetric else '--asymmetric'} is not "
                               f"available; choose one of {', '.join(SCHEMES)}")
    return name


def quantize(w: np.ndarray, bits: int, block: int, scheme: str, importance: np.ndarray | None = None) -> BlockQuant:
    if bits not in BITS:
        raise BadArgumentError(f"--bits {bits} is not supported; choose 4 or 8")
    if scheme not in SCHEMES:
        raise BadArgumentError(f"unknown quantization scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    fit = SCHEMES[scheme][1]
    if importance is not None and fit in (mse_float_min, mse_zero_point):
        return _with_cols(fit(w, bits, block, importance), w.shape[1])
    return _with_cols(fit(w, bits, block), w.shape[1])
