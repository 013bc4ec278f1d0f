"""`edgellama eval`: perplexity over a text, and agreement with a reference model.

Windows of `window` tokens advance by `stride` (default: the window, i.e. non-overlapping).
Each window is one uncached forward pass; the tokens it scores are those not scored by an
earlier window (all of them for the first), each predicted from what precedes it in the
window. No BOS is added unless the tokenizer adds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgellama.runtime import contract as io
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model


_ROWS = 64


@dataclass(frozen=True)
class EvalResult:
    perplexity: float
    tokens: int  # tokens scored
    kl: float | None = None  # mean KL(reference || model), nats per token
    top1_agreement: float | None = None  # share of positions with the same argmax

    def to_dict(self) -> dict:
        out = {"perplexity": self.perplexity, "tokens": self.tokens}
        if self.kl is not None:
            out.update(kl=self.kl, top1_agreement=self.top1_agreement)
        return out


def full_logits(model: Model, ids: Sequence[int]) -> np.ndarray:
    """(len(ids), vocab) float32 logits of one uncached pass (every position kept)."""
    g = model.graph_io
    empty = np.zeros((1, g.num_kv_heads, 0, g.head_dim), g.kv_dtype)
    feeds = {io.INPUT_IDS: np.asarray([ids], np.int64), io.ATTENTION_MASK: np.ones((1, len(ids)), np.int64)}
    if g.has_position_ids:
        feeds[io.POSITION_IDS] = np.arange(len(ids), dtype=np.int64)[None]
    for i in range(g.num_layers):
        feeds[io.past_key(i)] = feeds[io.past_value(i)] = empty
    feeds.update(g.keep(0))
    return model.session.run([io.LOGITS], feeds)[0][0]


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x -= x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def windows(n_tokens: int, window: int, stride: int):
    """(start, end, first scored position) per window; positions are absolute."""
    start, scored_to = 0, 1  # the very first token has nothing to be predicted from
    while scored_to < n_tokens:
        end = min(start + window, n_tokens)
        yield start, end, max(scored_to, start + 1)
        scored_to = end
        if end == n_tokens:
            break
        start = end if stride >= window else start + stride


def evaluate(model: Model, text: str, window: int = 512, stride: int | None = None,
             reference: Model | None = None,
             progress: Callable[[int, int, str], None] = lambda d, t, w: None) -> EvalResult:
    stride = stride or window
    if window < 2 or stride < 1 or stride > window:
        raise BadArgumentError(f"window must be >= 2 and 1 <= stride <= window (got {window}, {stride})")
    if window > model.context_length:
        raise BadArgumentError(f"window {window} is longer than the model's context {model.context_length}")
    ids = model.encode(text)
    if len(ids) < 2:
        raise BadArgumentError("the text has fewer than 2 tokens; nothing to score")
    if reference is not None and reference.encode(text) != ids:
        raise BadArgumentError("the reference model tokenizes the text differently; compare models with the same tokenizer")
    nll, kl, agree, count = 0.0, 0.0, 0, 0
    spans = list(windows(len(ids), window, stride))
    progress(0, len(spans), "score:windows")
    for i, (start, end, first) in enumerate(spans):
        chunk = ids[start:end]
        rows = slice(first - start - 1, end - start - 1)  # the positions predicting first..end-1
        logits = full_logits(model, chunk)[rows]
        ref_logits = full_logits(reference, chunk)[rows] if reference is not None else None
        targets = np.asarray(ids[first:end])
        for r in range(0, len(targets), _ROWS):  # float64 on a few rows at a time: memory stays small
            logp = log_softmax(logits[r:r + _ROWS])
            nll -= logp[np.arange(len(logp)), targets[r:r + _ROWS]].sum()
            if ref_logits is not None:
                ref = log_softmax(ref_logits[r:r + _ROWS])
                kl += float((np.exp(ref) * (ref - logp)).sum())
                agree += int((ref.argmax(-1) == logp.argmax(-1)).sum())
        count += len(targets)
        progress(i + 1, len(spans), "score:windows")
    ppl = float(np.exp(nll / count))
    if reference is None:
        return EvalResult(ppl, count)
    return EvalResult(ppl, count, kl / count, agree / count)
