"""Prefill, decode one token at a time, sample, stop, stream.

`Decoder` owns one generation's state (IOBinding, KV cache, input buffers) over a
shared read-only session; `Generation` is the iterator an app consumes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from . import contract as io
from .detokenize import StreamDecoder
from .errors import BadArgumentError, ContextOverflowError
from .kv_cache import KVCache, aligned_zeros
from .sampling import SamplingParams, make_sampler, token_prob, top_probs

if TYPE_CHECKING:
    from .model import Model

PREFILL_CHUNK = 256  # long prompts run in chunks: bounds the (chunk, vocab) logits buffer


class Decoder:
    """Runs the graph over new tokens, appending to its KV cache.

    Buffers: ids (capacity,) int64, mask (capacity,) int64 of ones, logits (1, 1, V)
    float32 for single-token steps; all bound by pointer, reused every step.
    """

    def __init__(self, model: "Model", capacity: int):
        self.model = model
        self.binding = model.session.io_binding()
        self.cache = KVCache(model.graph_io, model.shared_kv, capacity, model.device)
        self.tokens: list[int] = []  # what the cache holds
        self.fed = 0  # tokens run through the graph, over this decoder's life
        self._ids = aligned_zeros(capacity, np.int64)
        # Ones for the tokens the cache holds, zeros after: with a shared KV buffer every
        # decode step binds the whole (1, capacity) mask, so the graph sees the same shapes
        # each step and ONNX Runtime plans its memory once instead of once per length.
        self._mask = aligned_zeros(capacity, np.int64)
        self._fixed_shape = model.shared_kv
        self._pos = np.arange(capacity, dtype=np.int64)
        self._step_logits = aligned_zeros((1, 1, model.vocab_size), np.float32)
        self._keep_one = np.ones((), np.int64)
        if model.graph_io.has_logits_to_keep:  # only the last position's logits are ever needed
            self.binding.bind_input(io.LOGITS_TO_KEEP, "cpu", 0, np.int64, [], self._keep_one.ctypes.data)

    @property
    def capacity(self) -> int:
        return len(self._ids)

    def reserve(self, capacity: int) -> None:
        if capacity > self.capacity:
            ids, mask = aligned_zeros(capacity, np.int64), aligned_zeros(capacity, np.int64)
            ids[: len(self._ids)], mask[: self.cache.length] = self._ids, 1
            self._ids, self._mask = ids, mask
            self._pos = np.arange(capacity, dtype=np.int64)
        self.cache.reserve(capacity)

    def rewind(self, length: int) -> None:
        self.cache.truncate(length)
        self._mask[length:] = 0
        del self.tokens[length:]

    def forward(self, new_tokens: Sequence[int]) -> np.ndarray:
        """(vocab,) float32 logits after the last of `new_tokens`."""
        logits = None
        for start in range(0, len(new_tokens), PREFILL_CHUNK):
            logits = self._run(new_tokens[start:start + PREFILL_CHUNK])
        return logits

    def _run(self, chunk: Sequence[int]) -> np.ndarray:
        n, past = len(chunk), self.cache.length
        total = past + n
        self.reserve(total)
        self._ids[past:total] = chunk
        self._mask[past:total] = 1
        b = self.binding
        b.bind_input(io.INPUT_IDS, "cpu", 0, np.int64, [1, n], self._ids[past:].ctypes.data)
        mask_len = self.capacity if n == 1 and self._fixed_shape else total
        b.bind_input(io.ATTENTION_MASK, "cpu", 0, np.int64, [1, mask_len], self._mask.ctypes.data)
        if self.model.graph_io.has_position_ids:
            b.bind_input(io.POSITION_IDS, "cpu", 0, np.int64, [1, n], self._pos[past:].ctypes.data)
        if n == 1:
            b.bind_output(io.LOGITS, "cpu", 0, np.float32, list(self._step_logits.shape), self._step_logits.ctypes.data)
        else:
            b.bind_output(io.LOGITS, "cpu")
        bound = [io.LOGITS] + self.cache.bind(b)  # get_outputs() follows binding order
        self.model.session.run_with_iobinding(b)
        outputs = dict(zip(bound, b.get_outputs())) if not self.cache.shared or n > 1 else {}
        self.cache.advance(n, outputs)
        self.tokens.extend(int(t) for t in chunk)
        self.fed += n
        if n == 1:
            return self._step_logits[0, 0]
        return outputs[io.LOGITS].numpy()[0, -1]


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
        common = 0
        for a, b in zip(d.tokens, self.prompt_ids):
            if a != b:
                break
            common += 1
        common = min(common, len(self.prompt_ids) - 1)  # at least one token to get logits from
        d.rewind(common)
        d.reserve(len(self.prompt_ids) + self.max_new)
        return d.forward(self.prompt_ids[common:])

    def _steps(self) -> Iterator[Step]:
        cfg, model = self.config, self.model
        sampler = make_sampler(cfg.sampling)
        stops = StopStrings(cfg.stop)
        eos = set(cfg.stop_token_ids) | (set() if cfg.ignore_eos else set(model.eos_token_ids))
        history = np.empty(len(self.prompt_ids) + self.max_new, np.int64)
        history[: len(self.prompt_ids)] = self.prompt_ids
        n_hist = len(self.prompt_ids)
        detok = StreamDecoder(model.tokenizer, self.prompt_ids)
        logits = self._prefill()
        if cfg.show_probs:
            self.prompt_top = top_probs(logits, cfg.show_probs)
        for i in range(self.max_new):
            top = top_probs(logits, cfg.show_probs) if cfg.show_probs else None
            token = sampler(logits, history[:n_hist])
            if token in eos:
                self.finish_reason = "eos"
                break
            history[n_hist] = token
            n_hist += 1
            self.completion_ids.append(token)
            text = stops.feed(detok.push(token))
            self._pieces.append(text)
            yield Step(token, text, top, token_prob(logits, token, top) if top is not None else None)
            if stops.hit:
                self.finish_reason = "stop"
                break
            if i + 1 < self.max_new:
                logits = self.decoder.forward([token])
        else:
            self.finish_reason = "length"
        tail = stops.feed(detok.flush()) + stops.flush() if not stops.hit else ""
        if tail:
            self._pieces.append(tail)
            yield Step(None, tail, None)
        if self._on_finish:
            self._on_finish(self)
