"""Next-token sampling: a chain of small logit processors, then one draw.

    logits (vocab,) float32 from the graph
      -> float64
      -> penalties (repetition, presence, frequency)   needs history
      -> temperature
      -> top_k -> top_p -> min_p                        masked tokens become -inf
      -> softmax over what is left, one uniform draw from the sampler's own RNG

Each processor is a pure function ``(logits, history) -> logits`` on float64
arrays of shape (vocab,), so each can be tested alone and the chain is just a
list. Temperature 0 means greedy: argmax after the penalties (the filters cannot
change the argmax, so they are skipped).

This runs once per generated token on vocabularies of 49k-128k, so every step is
O(vocab) vectorized numpy: top-k and top-p partition or sort only the head of the
distribution (the tokens within a few logits of the max, see _head), and the draw
searches a blocked CDF instead of running one long cumsum.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from numbers import Integral, Real
from typing import Callable

import numpy as np

from .errors import BadArgumentError

Processor = Callable[[np.ndarray, np.ndarray], np.ndarray]


GREEDY_BELOW = 1e-5  # a temperature below this samples as greedy: logits / 1e-308 overflow


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # (0, 1]; 1 = off
    min_p: float = 0.0  # [0, 1); 0 = off
    repetition_penalty: float = 1.0  # > 0; HF: seen logits, positive / r, negative * r
    presence_penalty: float = 0.0  # OpenAI: subtract once if the token was seen
    frequency_penalty: float = 0.0  # OpenAI: subtract count * f
    seed: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise BadArgumentError naming the first field whose value is out of range."""
        for f in fields(self):
            _check_type(f.name, getattr(self, f.name))
        _check_range("temperature", self.temperature, self.temperature >= 0, ">= 0 (0 = greedy)")
        _check_range("top_k", self.top_k, self.top_k >= 0, ">= 0 (0 = off)")
        _check_range("top_p", self.top_p, 0 < self.top_p <= 1, "in (0, 1] (1 = off)")
        _check_range("min_p", self.min_p, 0 <= self.min_p < 1, "in [0, 1) (0 = off)")
        _check_range("repetition_penalty", self.repetition_penalty, 1e-4 <= self.repetition_penalty <= 1e4,
                     "in [0.0001, 10000] (1 = off)")  # beyond it, logits overflow to inf
        if self.seed is not None:
            _check_range("seed", self.seed, self.seed >= 0, ">= 0")

    @property
    def greedy(self) -> bool:
        """0, or a temperature so small that dividing by it overflows (as vLLM treats it)."""
        return self.temperature < GREEDY_BELOW


_INT_FIELDS = {"top_k": False, "seed": True}  # name -> None allowed


def _check_type(name: str, value: object) -> None:
    # bool is an int subclass; True as a temperature or top_k is always a mistake.
    if name in _INT_FIELDS:
        ok = (value is None and _INT_FIELDS[name]) or (
            isinstance(value, Integral) and not isinstance(value, bool)
        )
        kind = "an integer" + (" or None" if _INT_FIELDS[name] else "")
    else:
        ok = isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value)
        kind = "a finite number"
    if not ok:
        raise BadArgumentError(f"sampling: {name} is {value!r}; give {kind}")


def _check_range(name: str, value: object, ok: bool, allowed: str) -> None:
    if not ok:
        raise BadArgumentError(f"sampling: {name} {value!r} is out of range; give a value {allowed}")


# --- processors: (logits (vocab,) float64, history (n,) int64) -> logits -----------------
# History may repeat ids: ``out[h] = f(x[h])`` writes the same value for each repeat,
# so no np.unique (a sort) is needed.


def repetition_penalty(r: float) -> Processor:
    """HF semantics: each token seen in history has its logit divided by r if
    positive, multiplied by r if negative (so r > 1 always makes it less likely)."""

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        out = logits.copy()
        x = logits[history]
        out[history] = np.where(x < 0, x * r, x / r)
        return out

    return apply


def presence_frequency_penalty(presence: float, frequency: float) -> Processor:
    """OpenAI semantics: logit -= count * frequency + (count > 0) * presence."""

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        counts = np.bincount(history, minlength=logits.shape[0])[history]  # (n,)
        out = logits.copy()
        out[history] = logits[history] - counts * frequency - presence
        return out

    return apply


def temperature(t: float) -> Processor:
    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        return logits / t

    return apply


def top_k(k: int) -> Processor:
    """Keep the k largest logits (ties with the k-th are kept too, like HF)."""

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        if k >= logits.shape[0]:
            return logits
        head = logits[_head(logits, lambda ids: ids.shape[0] >= k)]
        kth = np.partition(head, -k)[-k]  # the k-th largest overall: head holds the top k
        return np.where(logits < kth, -np.inf, logits)

    return apply


def top_p(p: float) -> Processor:
    """Nucleus: keep the most likely tokens until their mass reaches p (HF
    semantics: a token stays if the mass strictly before it, in descending order,
    is < p; the most likely token always stays)."""

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        w = np.exp(logits - logits.max())  # unnormalized probabilities
        mass = p * w.sum()
        head = _head(logits, lambda ids: w[ids].sum() >= mass)
        head = head[np.argsort(-w[head], kind="stable")]  # only the head is sorted
        before = np.cumsum(w[head]) - w[head]  # mass strictly before each
        keep = head[: max(1, int(np.count_nonzero(before < mass)))]
        out = np.full_like(logits, -np.inf)
        out[keep] = logits[keep]
        return out

    return apply


def min_p(m: float) -> Processor:
    """Keep tokens with prob >= m * max prob, i.e. logit >= max logit + log(m)."""
    log_m = math.log(m)

    def apply(logits: np.ndarray, history: np.ndarray) -> np.ndarray:
        return np.where(logits < logits.max() + log_m, -np.inf, logits)

    return apply


# --- pieces -------------------------------------------------------------------------------


def softmax(logits: np.ndarray) -> np.ndarray:
    """float64 softmax; -inf entries get probability 0."""
    e = np.exp(logits - logits.max())
    return e / e.sum()


def _head(logits: np.ndarray, enough: Callable[[np.ndarray], bool]) -> np.ndarray:
    """Ids of every logit >= max - d, for the first d in 2, 4, ..., 32, inf whose
    set is enough. Such a set is always the top-|set| tokens, so it holds any top-k or
    nucleus it is big enough for, and sorting or partitioning it instead of the
    whole vocab is what makes top-k/top-p cheap on peaked distributions."""
    m = logits.max()
    for d in (2.0, 4.0, 8.0, 16.0, 32.0):
        ids = np.flatnonzero(logits >= m - d)
        if enough(ids):
            return ids
    return np.arange(logits.shape[0])


def _inverse_cdf(weights: np.ndarray, frac: float) -> int:
    """The first i with cumsum(weights)[i] > frac * weights.sum(), 0 <= frac < 1.

    np.cumsum is sequential (~4 ns per element), so sum blocks of 4096
    (vectorized), find the block, and cumsum only inside it."""
    starts = np.arange(0, weights.shape[0], _BLOCK)
    block_cdf = np.cumsum(np.add.reduceat(weights, starts))  # (n_blocks,)
    u = frac * block_cdf[-1]  # < block_cdf[-1], so block b has weight > 0
    b = int(np.searchsorted(block_cdf, u, side="right"))
    inside = weights[starts[b] : starts[b] + _BLOCK]
    u -= block_cdf[b - 1] if b else 0.0
    i = min(int(np.searchsorted(np.cumsum(inside), u, side="right")), inside.shape[0] - 1)
    while inside[i] == 0:  # rounding put u past the block's last nonzero weight
        i -= 1
    return int(starts[b]) + i


_BLOCK = 4096


def top_probs(logits: np.ndarray, k: int) -> list[tuple[int, float]]:
    """The k most likely next tokens under softmax(raw logits) (temperature 1, no
    filters): [(token_id, probability)] sorted by probability descending, ties by id."""
    if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
        raise BadArgumentError(f"top_probs: k must be an integer >= 0, got {k!r}")
    if k == 0:
        return []
    x = np.asarray(logits, dtype=np.float64)
    probs = softmax(x)
    ids = _head(x, lambda ids: ids.shape[0] >= k)
    ids = ids[np.lexsort((ids, -probs[ids]))][:k]  # by probability, then id
    return [(int(i), float(probs[i])) for i in ids]


def token_prob(logits: np.ndarray, token: int, top: list[tuple[int, float]] = ()) -> float:
    """Probability of `token` under softmax(raw logits), the distribution top_probs
    reads; looked up in `top` (its output) when it is there."""
    for tid, p in top:
        if tid == token:
            return p
    x = np.asarray(logits, dtype=np.float64)
    return float(softmax(x)[token])


def build_processors(params: SamplingParams) -> list[Processor]:
    """The chain for params; empty processors (values that mean off) are left out.
    For greedy params only the penalties are returned."""
    chain: list[Processor] = []
    if params.repetition_penalty != 1:
        chain.append(repetition_penalty(params.repetition_penalty))
    if params.presence_penalty != 0 or params.frequency_penalty != 0:
        chain.append(presence_frequency_penalty(params.presence_penalty, params.frequency_penalty))
    if params.greedy:
        return chain
    if params.temperature != 1:
        chain.append(temperature(params.temperature))
    if params.top_k > 0:
        chain.append(top_k(params.top_k))
    if params.top_p < 1:
        chain.append(top_p(params.top_p))
    if params.min_p > 0:
        chain.append(min_p(params.min_p))
    return chain


class Sampler:
    """Built by make_sampler(params); one per generation (owns its RNG,
    numpy.random.Generator(PCG64(seed)): same seed, same tokens, in any process)."""

    def __init__(self, params: SamplingParams):
        self.params = params
        self.processors = build_processors(params)
        self.rng = np.random.Generator(np.random.PCG64(params.seed))

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        """logits: (vocab,) for the next token; history: int64 ids of prompt +
        generated so far (read by the penalties only)."""
        if self.params.greedy and not self.processors:
            return int(np.argmax(logits))  # fast path: no copy, no float64
        x = np.asarray(logits, dtype=np.float64)
        h = np.asarray(history, dtype=np.int64)
        for process in self.processors:
            x = process(x, h)
        if self.params.greedy:
            return int(np.argmax(x))
        return self._draw(x)

    def verify(self, logits: np.ndarray, history: np.ndarray, draft: int) -> tuple[int, bool]:
        """The token at a position where a drafter proposed `draft`: (token, draft accepted).

        Greedy: the argmax, accepted when it is the draft. Sampling (the drafters here
        propose one token, a point mass): accept the draft with its probability p(draft)
        under the processed distribution, else draw from p without the draft. Either way
        the token is distributed as a plain draw from p."""
        if self.params.greedy:
            token = self(logits, history)
            return token, token == draft
        x = np.asarray(logits, dtype=np.float64)
        h = np.asarray(history, dtype=np.int64)
        for process in self.processors:
            x = process(x, h)
        if x[draft] > -np.inf:
            live = x[x > -np.inf]
            p_draft = math.exp(x[draft] - live.max()) / np.exp(live - live.max()).sum()
            if self.rng.random() < p_draft:
                return int(draft), True
        x[draft] = -np.inf
        if not np.isfinite(x).any():  # p(draft) was 1 up to rounding
            return int(draft), True
        return self._draw(x), False

    def _draw(self, logits: np.ndarray) -> int:
        # One uniform per token, mapped through the CDF of the tokens the filters
        # left (often a few dozen, so exp and CDF are cheap).
        ids = np.flatnonzero(logits > -np.inf)  # (n_left,); NaN compares False too
        if not len(ids):
            raise BadArgumentError("no token is left to sample: every logit is -inf or NaN after the sampling "
                                   "options; loosen them (or check the model's output)")
        x = logits[ids]
        weights = np.exp(x - x.max())  # unnormalized probabilities
        return int(ids[_inverse_cdf(weights, self.rng.random())])


def make_sampler(params: SamplingParams) -> Sampler:
    return Sampler(params)
