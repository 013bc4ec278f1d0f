"""Sample, stop, stream: `Generation` is the iterator an app consumes.

It drives a `Decoder` (runtime/decoder.py): prefill what the cache does not hold, then
decode one token at a time until EOS, a stop string or the token budget.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .decoder import Decoder
from .detokenize import StreamDecoder
from .errors import BadArgumentError, ContextOverflowError
from .sampling import SamplingParams, make_sampler, token_prob, top_probs

if TYPE_CHECKING:
    from .model import Model

@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()  # stop strings; not emitted
    stop_token_ids: tuple[int, ...] = ()  # besides the model's EOS
    ignore_eos: bool = False
    show_probs: int = 0  # attach the top-k next-token distribution to each step

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BadArgumentError(f"max_new_tokens is {self.max_new_tokens!r}; give a positive integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise BadArgumentError("stop strings must be non-empty text")
        if self.show_probs < 0:
            raise BadArgumentError(f"show_probs must be >= 0, got {self.show_probs}")


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the text it completed (may be ""), and optionally the
    distribution it was drawn from: [(token_id, probability)] for the top k, and the
    chosen token's probability under that same distribution."""

    token_id: int | None  # None: text flushed at the end, no new token
    text: str
    top: list[tuple[int, float]] | None = None
    prob: float | None = None


class StopStrings:
    """Holds back text that may be the start of a stop string; cuts at a full match."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending, self.hit = tuple(stops), "", False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.pending = self.pending[:cut], ""
            return out
        keep = max((k for s in self.stops for k in range(1, len(s)) if self.pending.endswith(s[:k])), default=0)
        out = self.pending[: len(self.pending) - keep]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


class Generation:
    """Iterator of `Step`s. After it ends: finish_reason ("eos" | "stop" | "length"),
    prompt_tokens, completion_tokens, text (all of it), prompt_top (if show_probs)."""

    def __init__(self, model: "Model", prompt_ids: Sequence[int], config: GenerationConfig,
                 decoder: Decoder | None = None, on_finish: Callable[["Generation"], None] | None = None):
        self.model, self.config, self._on_finish = model, config, on_finish
        self.prompt_ids = list(prompt_ids)
        if not self.prompt_ids:
            raise BadArgumentError("the prompt is empty; give at least one token of text")
        limit = model.context_length
        if len(self.prompt_ids) >= limit:
            raise ContextOverflowError(
                f"prompt is {len(self.prompt_ids)} tokens but the model's context is {limit}; shorten the prompt"
            )
        # Policy: generation stops with finish_reason "length" where the context ends.
        self.max_new = min(config.max_new_tokens, limit - len(self.prompt_ids))
        self.decoder = decoder or Decoder(model, len(self.prompt_ids) + self.max_new)
        self.finish_reason: str | None = None
        self.completion_ids: list[int] = []
        self.prompt_top: list[tuple[int, float]] | None = None
        self._pieces: list[str] = []
        self._iter = self._steps()

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return len(self.completion_ids)

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    def __iter__(self) -> Iterator[Step]:
        return self._iter

    def __next__(self) -> Step:
        return next(self._iter)

    def _prefill(self) -> np.ndarray:
        """Feed only what the cache does not already hold (chat turns reuse it)."""
        d = self.decoder
        held = d.reuse(self.prompt_ids)
        d.cache.reserve(len(self.prompt_ids) + self.max_new)
        return d.prefill(self.prompt_ids[held:])

    def _steps(self) -> Iterator[Step]:
        cfg, model = self.config, self.model
        sampler = make_sampler(cfg.sampling)
        stops = StopStrings(cfg.stop)
        eos = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else set(model.eos_token_ids))
        detok = StreamDecoder(model.tokenizer, self.prompt_ids)
        logits = self._prefill()
        if cfg.show_probs:
            self.prompt_top = top_probs(logits, cfg.show_probs)
        for i in range(self.max_new):
            top = top_probs(logits, cfg.show_probs) if cfg.show_probs else None
            token = sampler(logits, self.decoder.tokens)  # the history: everything the cache holds
            if token in eos:
                self.finish_reason = "eos"
                break
            self.completion_ids.append(token)
            text = stops.feed(detok.push(token))
            self._pieces.append(text)
            yield Step(token, text, top, token_prob(logits, token, top) if top is not None else None)
            if stops.hit:
                self.finish_reason = "stop"
                break
            if i + 1 < self.max_new:
                logits = self.decoder.decode_one(token)
        else:
            self.finish_reason = "length"
        tail = stops.feed(detok.flush()) + stops.flush() if not stops.hit else ""
        if tail:
            self._pieces.append(tail)
            yield Step(None, tail, None)
        if self._on_finish:
            self._on_finish(self)
