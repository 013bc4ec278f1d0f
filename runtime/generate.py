"""Sample, stop, stream: `Generation` is the iterator an app consumes.

It drives a `Decoder` (runtime/decoder.py): prefill what the cache does not hold, then
decode one token at a time until EOS, a stop string or the token budget.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from .decoder import Decoder
from .detokenize import StreamDecoder
from .errors import BadArgumentError, ContextOverflowError
from .speculate import AdaptiveK, SpeculationStats, check_draft_tokens, make_drafter
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
    speculate: object = None  # None | "ngram" | speculate.NGram(...) | speculate.Draft(model)
    draft_tokens: int = 8  # the most tokens drafted per forward (adapts below it); 0 = plain
    constraint: object = None  # None | constrain.Grammar: what the output must match

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise BadArgumentError(f"max_new_tokens is {self.max_new_tokens!r}; give a positive integer")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise BadArgumentError("stop strings must be non-empty text")
        if self.show_probs < 0:
            raise BadArgumentError(f"show_probs must be >= 0, got {self.show_probs}")
        check_draft_tokens(self.draft_tokens)


@dataclass(frozen=True)
class Step:
    """One generated token: its id, the text it completed (may be ""), and optionally the
    distribution it was drawn from: [(token_id, probability)] for the top k, and the
    chosen token's probability under that same distribution."""

    token_id: int | None  # None: text flushed at the end, no new token
    text: str
    top: list[tuple[int, float]] | None = None
    prob: float | None = None


@dataclass(frozen=True)
class Timings:
    """Where one generation's time went (`Generation.timings`; read while iterating too).

    prompt_tokens = cached_tokens (already in the KV cache: a chat turn's history) +
    prefilled_tokens (run through the graph before the first token). decoded_tokens: the
    tokens drawn after the first, an end-of-turn token included (it cost a forward too);
    generated_tokens: the reply's tokens (no end-of-turn)."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_seconds: float = 0.0  # reusing the cache and running the rest of the prompt
    first_token_seconds: float = 0.0  # from the first step asked for to the first token drawn
    generated_tokens: int = 0
    decoded_tokens: int = 0
    decode_seconds: float = 0.0  # from the first token drawn to the last

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens

    @property
    def prefill_tokens_per_s(self) -> float | None:
        return self.prefilled_tokens / self.prefill_seconds if self.prefill_seconds > 0 else None

    @property
    def decode_tokens_per_s(self) -> float | None:
        return self.decoded_tokens / self.decode_seconds if self.decoded_tokens and self.decode_seconds > 0 else None

    def to_dict(self) -> dict:
        return {**self.__dict__, "prefilled_tokens": self.prefilled_tokens,
                "prefill_tokens_per_s": self.prefill_tokens_per_s, "decode_tokens_per_s": self.decode_tokens_per_s}


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
    prompt_tokens, completion_tokens, text (all of it), prompt_top (if show_probs), and
    timings (also while it runs).

    Stopped early, it ends with finish_reason "interrupted" and text as far as it was
    yielded, and calls on_abort (on_finish runs only for a generation that ended by itself):
    closed between steps (`close()`, or dropped), its decoder's cache holds exactly the tokens
    it fed; stopped by an exception raised inside a step (KeyboardInterrupt in a forward, an
    onnxruntime error), `consistent` is False: the cache may be half-updated, so do not reuse
    its decoder."""

    def __init__(self, model: "Model", prompt_ids: Sequence[int], config: GenerationConfig,
                 decoder: Decoder | None = None, on_finish: Callable[["Generation"], None] | None = None,
                 on_abort: Callable[["Generation"], None] | None = None, drafter=None):
        self.model, self.config, self._on_finish, self._on_abort = model, config, on_finish, on_abort
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
        self.speculation = SpeculationStats()  # with config.speculate: drafted, accepted, forwards
        # drafter: one kept by the caller across generations (a chat's draft model keeps its cache)
        self._drafter = (drafter or make_drafter(config.speculate, model)) if config.draft_tokens else None
        self.constraint = None
        if config.constraint is not None:  # compiled now: a bad grammar fails before any work
            from .constrain import Constraint

            self.constraint = Constraint(model, config.constraint)
        self._pieces: list[str] = []
        self.consistent = True  # False once an exception escaped a step: see the class docstring
        # timings: perf_counter stamps, set as the steps run
        self._cached, self._prefill_s = 0, 0.0
        self._t_start = self._t_first = self._t_last = None
        self._drawn = 0  # tokens drawn, an end-of-turn one included
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

    @property
    def started(self) -> bool:
        """The first step was asked for."""
        return self._t_start is not None

    @property
    def timings(self) -> Timings:
        """prefill and decode times and rates so far (see `Timings`)."""
        start, first, last = self._t_start, self._t_first, self._t_last
        return Timings(
            prompt_tokens=len(self.prompt_ids), cached_tokens=self._cached, prefill_seconds=self._prefill_s,
            first_token_seconds=(first - start) if first is not None else 0.0,
            generated_tokens=len(self.completion_ids), decoded_tokens=max(self._drawn - 1, 0),
            decode_seconds=(last - first) if first is not None else 0.0)

    def __iter__(self) -> Iterator[Step]:
        return self._iter

    def __next__(self) -> Step:
        return next(self._iter)

    def close(self) -> None:
        """Stop between steps (see the class docstring); nothing happens once it has ended,
        and one never started just never runs."""
        self._iter.close()

    def _prefill(self) -> np.ndarray:
        """Feed only what the cache does not already hold (chat turns reuse it)."""
        d, start = self.decoder, time.perf_counter()
        held = d.reuse(self.prompt_ids)
        self._cached = held
        d.cache.reserve(len(self.prompt_ids) + self.max_new)
        logits = d.prefill(self.prompt_ids[held:])
        self._prefill_s = time.perf_counter() - start
        return logits

    def _steps(self) -> Iterator[Step]:
        self._t_start = time.perf_counter()
        try:
            yield from self._run()
        except GeneratorExit:  # closed at a yield: the cache holds what was fed
            self._abort()
            raise
        except BaseException:  # raised inside a step: the cache may be half-updated
            self.consistent = False
            self._abort()
            raise
        finally:
            if self.constraint is not None:
                self.constraint.close()  # no mask left computing for a generation that is over
        if self._on_finish:
            self._on_finish(self)

    def _abort(self) -> None:
        self.finish_reason = "interrupted"
        if self._on_abort:
            self._on_abort(self)

    def _run(self) -> Iterator[Step]:
        cfg, model = self.config, self.model
        sampler = make_sampler(cfg.sampling)
        if self.constraint is not None:
            from .constrain import ConstrainedSampler

            sampler = ConstrainedSampler(sampler, self.constraint)
        stops = StopStrings(cfg.stop)
        eos = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else set(model.eos_token_ids))
        detok = StreamDecoder(model.tokenizer, self.prompt_ids)
        source = self._plain(sampler) if self._drafter is None else self._speculative(sampler)
        for token, logits in source:
            self._t_last = time.perf_counter()
            if self._t_first is None:
                self._t_first = self._t_last
            self._drawn += 1
            top = top_probs(logits, cfg.show_probs) if cfg.show_probs else None
            if token in eos:
                self.finish_reason = "eos"
                break
            self.completion_ids.append(token)
            text = stops.feed(detok.push(token))
            self._pieces.append(text)
            yield Step(token, text, top, token_prob(logits, token, top) if top is not None else None)
            if stops.hit or (self.constraint is not None and self.constraint.done):
                self.finish_reason = "stop"
                break
            if len(self.completion_ids) == self.max_new:
                self.finish_reason = "length"
                break
        tail = stops.feed(detok.flush()) + stops.flush() if not stops.hit else ""
        if tail:
            self._pieces.append(tail)
            yield Step(None, tail, None)

    def _first(self, sampler) -> tuple[int, np.ndarray]:
        logits = self._prefill()
        if self.config.show_probs:
            self.prompt_top = top_probs(logits, self.config.show_probs)
        return sampler(logits, self.decoder.tokens), logits

    def _plain(self, sampler) -> Iterator[tuple[int, np.ndarray]]:
        """(token, the logits it was drawn from), one forward per token; the consumer stops
        pulling after the last token it needs, so that one is never fed."""
        token, logits = self._first(sampler)
        while True:
            yield token, logits
            logits = self.decoder.decode_one(token)
            token = sampler(logits, self.decoder.tokens)  # the history: everything the cache holds

    def _speculative(self, sampler) -> Iterator[tuple[int, np.ndarray]]:
        """As _plain, but each forward feeds the pending token and up to k drafts, and yields
        the drafts the sampler accepts plus one token of the model's own."""
        d, stats, adapt = self.decoder, self.speculation, AdaptiveK(self.config.draft_tokens)
        token, logits = self._first(sampler)
        while True:
            yield token, logits
            budget = self.max_new - len(self.completion_ids) - 1  # tokens still wanted after `token`
            k = min(adapt.next(), budget)
            drafts = self._drafter.propose(np.append(d.tokens, token), k) if k > 0 else []
            if drafts and self.constraint is not None:  # only what the grammar could take
                drafts = drafts[: self.constraint.valid_prefix(drafts)]
            stats.forwards += 1
            if not drafts:
                logits = d.decode_one(token)
                token = sampler(logits, d.tokens)
                stats.tokens += 1
                continue
            rows = d.verify([token] + drafts)
            base = d.cache.length - len(rows)  # the cache's length before `token`
            accepted = 0
            for i, draft in enumerate(drafts):
                token, ok = sampler.verify(rows[i], d.tokens[: base + i + 1], draft)
                if not ok:
                    break
                accepted += 1
                yield token, rows[i]
            else:
                token = sampler(rows[-1], d.tokens)  # every draft held: one more from the last row
            d.cache.rewind(len(drafts) - accepted)
            logits = rows[accepted]
            adapt.update(len(drafts), accepted)
            stats.drafted += len(drafts)
            stats.accepted += accepted
            stats.tokens += accepted + 1
