"""Mixed precision: which projections get 8 bits when a preset or a size budget allows it.

Every projection that would be quantized to --bits 4 is fitted at 4 and at 8 bits, and each
fit's cost is measured on the calibration text: the relative output error

    e(W') = tr((W' - W) H (W' - W)^T) / tr(W H W^T),    H = sum of x x^T over the text,

the share of that projection's output (on real activations) the fit gets wrong — the
objective GPTQ minimises, here used to rank; H is its diagonal unless GPTQ collected the
whole matrix. Upgrading a projection to 8 bits buys
e4 - e8 for the extra bytes it costs; projections are upgraded in order of that gain per
byte while the folder stays within its budget. A weight without statistics (no calibration)
gets H = I, the plain weight error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from edgellama.buildkit.graph_writer import stored_size
from edgellama.buildkit.quant_options import QuantOptions
from edgellama.buildkit.schemes import BlockQuant, quantize
from edgellama.runtime.errors import BadArgumentError


@dataclass(frozen=True)
class Candidate:
    key: tuple  # the weight's key, as rewrite._weight_key
    name: str  # the initializer
    bytes4: int
    bytes8: int
    error4: float
    error8: float

    @property
    def gain_per_byte(self) -> float:
        return (self.error4 - self.error8) / max(self.bytes8 - self.bytes4, 1)


def quantized_bytes(n: int, k: int, bits: int, block: int, scheme: str) -> int:
    """The most a (N, K) weight quantized this way takes in model.onnx.data: codes, float16
    scales (BlockQuant.with_half_scales), and the zero points or float mins its scheme writes."""
    nb = -(-k // block)
    total = stored_size(n * nb * block * bits // 8) + stored_size(n * nb * 2)
    if scheme.endswith("zeropoint"):
        total += stored_size(n * -(-nb * bits // 8))
    elif scheme.endswith("asymmetric"):
        total += stored_size(n * nb * 2)
    return total


def output_error(w: np.ndarray, bq: BlockQuant, hessian: np.ndarray | None) -> float:
    """tr(D H D^T) / tr(W H W^T) for D = deq(bq) - W: H the (K, K) statistics, or their (K,)
    diagonal (what calibration collects unless GPTQ needs the whole matrix), or None (H = I)."""
    d = bq.dequantize() - w
    if hessian is None:
        return float((d * d).sum() / max(float((w * w).sum()), 1e-30))
    h = np.asarray(hessian, np.float64)
    if h.ndim == 1:
        return float((d * d).sum(0) @ h / max(float((w * w).sum(0) @ h), 1e-30))
    num = float(np.einsum("nk,nk->", d @ h, d))
    den = float(np.einsum("nk,nk->", w @ h, w))
    return num / max(den, 1e-30)


def measure(weights: list[tuple[tuple, str, Callable[[], np.ndarray], np.ndarray | None]], opt: QuantOptions,
            progress: Callable[[int, int, str], None] = lambda done, total, what: None) -> list[Candidate]:
    """Fit each (key, name, read (N, K) float32, hessian) at 4 and at 8 bits and measure both."""
    out = []
    progress(0, len(weights), "sensitivity:tensors")
    for i, (key, name, read, hessian) in enumerate(weights):
        w = read()
        imp = None if hessian is None else (hessian if np.ndim(hessian) == 1 else np.diag(hessian))
        fits, sizes = {}, {}
        for bits in (4, 8):
            scheme = opt.scheme_for(bits)
            use_imp = imp if scheme.startswith("mse") else None
            fits[bits] = quantize(w, bits, opt.block_size, scheme, importance=use_imp)
            sizes[bits] = quantized_bytes(*w.shape, bits, opt.block_size, scheme)
        out.append(Candidate(key, name, sizes[4], sizes[8],
                             output_error(w, fits[4], hessian), output_error(w, fits[8], hessian)))
        progress(i + 1, len(weights), "sensitivity:tensors")
    return out


def choose(candidates: list[Candidate], fixed_bytes: int, budget_bytes: int | None, share: float) -> set[tuple]:
    """The keys to upgrade to 8 bits: by gain per byte, within `budget_bytes` for the whole
    folder, or (no budget) spending `share` of the bytes an all-8-bit choice would add."""
    floor = fixed_bytes + sum(c.bytes4 for c in candidates)
    if budget_bytes is not None and budget_bytes < floor:
        raise BadArgumentError(f"--size-budget {budget_bytes / 1e6:.3g} MB is below the smallest folder these "
                               f"options write ({floor / 1e6:.3g} MB); raise it, or make the tables smaller "
                               "(--preset small, or --embeddings / --lm-head int4)")
    headroom = (budget_bytes - floor if budget_bytes is not None
                else share * sum(c.bytes8 - c.bytes4 for c in candidates))
    chosen: set[tuple] = set()
    for c in sorted(candidates, key=lambda c: c.gain_per_byte, reverse=True):
        extra = c.bytes8 - c.bytes4
        if c.error4 > c.error8 and extra <= headroom:
            chosen.add(c.key)
            headroom -= extra
    return chosen
