"""Speculative decoding: draft a few tokens cheaply, let the model check them in one forward.

    drafts = drafter.propose(history, k)       # history: every token so far, the pending one last
    rows   = decoder.verify([pending] + drafts) # (k + 1, vocab): one forward over k + 1 tokens
    keep drafts while the sampler agrees (Sampler.verify), then one token of the model's own;
    rewind the cache past the first rejected draft.

Greedy, every emitted token is the model's argmax at its position, so the text is the
plain greedy text wherever one forward over k + 1 tokens gives the logits k + 1 single
steps would (fp32: equal to ~1e-7; with int8 activations those 1e-7 move a value across an
int8 rounding boundary now and then, and logits part by up to ~0.7, README). Sampling
uses the speculative-sampling rule for a point-mass draft, so the output distribution is
the model's.

Two drafters behind one interface (`propose(history, k) -> list[int]`):

    NGram   prompt lookup: the tokens that followed the latest earlier occurrence of the
            longest suffix n-gram of the history (summaries, extraction, edits, quoting)
    Draft   a smaller model with the same vocabulary, greedy, with its own KV cache

How many to draft adapts (AdaptiveK): the cap while recent drafts mostly hold, down to 0
(plain decoding) when they keep failing, probing again now and then.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from .errors import BadArgumentError

if TYPE_CHECKING:
    from .model import Model

MAX_DRAFT_TOKENS = 16


class Drafter(Protocol):
    def propose(self, history: np.ndarray, k: int) -> list[int]:
        """Up to k tokens likely to follow `history` ((n,) int64)."""


# ---- n-gram lookup ---------------------------------------------------------------------------

@dataclass(frozen=True)
class NGram:
    """Prompt-lookup drafting: no second model."""

    max_ngram: int = 4
    min_ngram: int = 2  # a one-token match drafts poorly (SmolLM2 copying a passage: 70 % of drafts
                        # accepted from 2-grams up, 62 % with 1-grams too)

    def __post_init__(self) -> None:
        if not 1 <= self.min_ngram <= self.max_ngram <= 8:
            raise BadArgumentError(f"n-gram sizes {self.min_ngram}..{self.max_ngram}: need 1 <= min <= max <= 8")

    def drafter(self, model: "Model") -> "NGramDrafter":
        return NGramDrafter(self.max_ngram, self.min_ngram)


class NGramDrafter:
    def __init__(self, max_ngram: int, min_ngram: int):
        self.max_ngram, self.min_ngram = max_ngram, min_ngram

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        n_hist = len(history)
        for n in range(min(self.max_ngram, n_hist - 1), self.min_ngram - 1, -1):
            suffix = history[n_hist - n:]
            # every earlier start of the suffix: windows over history[:-1] so the match is not itself
            windows = np.lib.stride_tricks.sliding_window_view(history[:-1], n)
            starts = np.flatnonzero((windows == suffix).all(axis=1))
            if len(starts):
                follow = int(starts[-1]) + n  # the latest occurrence: the nearest context
                return [int(t) for t in history[follow:follow + k]]
        return []


# ---- draft model ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Draft:
    """Drafting with a smaller model of the same vocabulary (a loaded `Model`)."""

    model: "Model" = field(repr=False)

    def check(self, target: "Model") -> None:
        same = self.model.tokenizer.get_vocab() == target.tokenizer.get_vocab()
        if not same or self.model.vocab_size > target.vocab_size:
            raise BadArgumentError(f"draft model {self.model.folder} has another vocabulary than {target.folder}; "
                                   "a draft model must use the same tokenizer")

    def drafter(self, target: "Model") -> "DraftDrafter":
        self.check(target)
        return DraftDrafter(self.model)


class DraftDrafter:
    def __init__(self, model: "Model"):
        from .decoder import Decoder

        self.decoder = Decoder(model, 256)

    def propose(self, history: np.ndarray, k: int) -> list[int]:
        d = self.decoder
        held = d.reuse(history)  # its cache: the last history it saw plus its own drafts
        d.cache.reserve(len(history) + k)
        logits = d.prefill(history[held:])
        drafts: list[int] = []
        while True:
            drafts.append(int(np.argmax(logits)))
            if len(drafts) == k:
                return drafts
            logits = d.decode_one(drafts[-1])


def make_drafter(speculate, target: "Model") -> Drafter | None:
    """speculate: None (plain decoding), "ngram", NGram(...) or Draft(model)."""
    if speculate is None:
        return None
    if speculate == "ngram":
        speculate = NGram()
    if not hasattr(speculate, "drafter"):
        raise BadArgumentError(f"speculate={speculate!r}: use 'ngram', NGram(...) or Draft(model)")
    return speculate.drafter(target)


# ---- how many to draft -----------------------------------------------------------------------

# One forward over S tokens costs about 1 + STEP_COST * (S - 1) single-token steps (measured on
# SmolLM2 int4, 2 threads: 1.11x at S=2, 1.78x at S=4, 2.52x at S=8): drafting one token pays
# off once more than STEP_COST of drafts are accepted.
STEP_COST = 0.22


class AdaptiveK:
    """The draft length: the cap while recent drafts mostly hold, plain decoding (0) once
    they stop paying for themselves, with a one-token probe now and then to notice text
    turning repetitive again. "Recent" is an exponential average over drafted tokens.

    Acceptance comes in runs (a copied passage is accepted whole, free text is rejected at
    once), so a geometric model of it drafts too short, and a failed draft counts as one
    rejection, not one per token after it. On SmolLM2's grounded prompts (128 tokens, median
    of 6): 2.92 tokens per forward on fp32, 2.70 on int4, against 1.81 and 1.59 when every
    token after a rejection counted, and 1.84 / 1.49 for a schedule that shrank the draft
    after each rejection."""

    def __init__(self, cap: int, floor: float = STEP_COST + 0.05, decay: float = 0.8, probe_every: int = 8):
        self.cap, self.floor, self.decay, self.probe_every = cap, floor, decay, probe_every
        self.rate = 0.6  # optimistic start: the first drafts decide
        self._idle = 0  # steps without a draft since the rate fell below the floor

    def next(self) -> int:
        if self.rate >= self.floor:
            return self.cap
        self._idle += 1
        return 1 if self._idle >= self.probe_every and self.cap else 0

    def update(self, drafted: int, accepted: int) -> None:
        if not drafted:
            return
        self._idle = 0
        for i in range(min(accepted + 1, drafted)):  # the drafts that held, then the one that failed
            self.rate = self.decay * self.rate + (1 - self.decay) * (1.0 if i < accepted else 0.0)


@dataclass
class SpeculationStats:
    forwards: int = 0  # target forwards after the prefill
    drafted: int = 0
    accepted: int = 0
    tokens: int = 0  # tokens emitted by those forwards

    @property
    def tokens_per_forward(self) -> float:
        return self.tokens / self.forwards if self.forwards else 0.0

    def to_dict(self) -> dict:
        return {"forwards": self.forwards, "drafted": self.drafted, "accepted": self.accepted,
                "tokens_per_forward": round(self.tokens_per_forward, 3)}


def check_draft_tokens(n: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= MAX_DRAFT_TOKENS:
        raise BadArgumentError(f"--draft-tokens is {n!r}; give 0 to {MAX_DRAFT_TOKENS} (0 = plain decoding)")
    return n

