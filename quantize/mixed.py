"""Mixed precision: which projections get 8 bits when a preset or a size budget allows it.

Every projection that would be quantized to --bits 4 is fitted at 4 and at 8 bits, and each
fit's cost is measured on the calibration text as the output error it adds,

    e(W') = tr((W' - W) H (W' - W)^T),    H = sum of x x^T over the text,

the squared error of that projection's outputs on real activations — the objective GPTQ
minimises; H is its diagonal unless GPTQ collected the whole matrix. The error is absolute,
not relative to the projection's output: in a Llama-style block every projection's error
lands in the same residual stream, so a projection with large outputs and a small relative
error can still hurt most (SmolLM2-135M at a 90 MB budget: perplexity +15.1 % ranked by
absolute error against +20.1 % by relative error, same size). Where the graph normalizes
projection outputs on their own (Gemma 3's q/k norms and its norms after attention and MLP),
their scale is divided away and the error is taken relative to tr(W H W^T) instead (Gemma 3
270M, same share: the absolute ranking upgraded every q/k/v projection, perplexity 53.45,
worse than upgrading none). Upgrading a projection to 8 bits buys e4 - e8 for the extra
bytes it costs; projections are upgraded in order of that gain per byte while the folder
stays within its budget. A weight without statistics (no calibration) gets H = I, the plain
weight error.
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


def output_error(w: np.ndarray, bq: BlockQuant, hessian: np.ndarray | None, relative: bool = False) -> float:
    """tr(D H D^T) for D = deq(bq) - W: H the (K, K) statistics, or their (K,) diagonal (what
    calibration collects unless GPTQ needs the whole matrix), or None (H = I); relative: over
    tr(W H W^T), the share of the projection's output it gets wrong."""
    d = bq.dequantize() - w
    h = np.ones(w.shape[1]) if hessian is None else np.asarray(hessian, np.float64)
    quad = (lambda m: float((m * m).sum(0) @ h)) if h.ndim == 1 else (lambda m: float(np.einsum("nk,nk->", m @ h, m)))
    return quad(d) / max(quad(w), 1e-30) if relative else quad(d)


def measure(weights: list[tuple[tuple, str, Callable[[], np.ndarray], np.ndarray | None]], opt: QuantOptions,
            progress: Callable[[int, int, str], None] = lambda done, total, what: None, relative: bool = False
            ) -> tuple[list[Candidate], dict[tuple, BlockQuant]]:
    """Fit each (key, name, read (N, K) float32, hessian) at 4 and at 8 bits and measure both
    (output_error; `relative` where the graph normalizes projection outputs). Also returns the
    4-bit fits by key (the costly ones; an 8-bit fit is a plain rounding), so the weights that
    stay at 4 bits are not fitted twice."""
    out, fits4 = [], {}
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
                             output_error(w, fits[4], hessian, relative), output_error(w, fits[8], hessian, relative)))
        fits4[key] = fits[4]
        progress(i + 1, len(weights), "sensitivity:tensors")
    return out, fits4


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
