"""Run the graph over new tokens: `prefill` a prompt, `decode_one` token at a time.

A `Decoder` owns one sequence's state over a shared read-only session: its IOBinding, its
KV cache (runtime/kv_cache.py) and a (1, 1, vocab) float32 logits buffer bound by pointer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import numpy as np

from . import contract as io
from .kv_cache import KVCache, aligned_zeros, make_cache

if TYPE_CHECKING:
    from .model import Model

PREFILL_CHUNK = 256  # long prompts run in chunks: bounds the (chunk, vocab) logits a graph may return


class Decoder:
    def __init__(self, model: "Model", capacity: int, cache: KVCache | None = None):
        self.session = model.session
        self.binding = model.session.io_binding()
        # Never past the context: a shared buffer's full length is the attention's total
        # length on single-token steps, which the graph's rope tables must cover.
        capacity = min(capacity, model.context_length)
        self.cache = cache or make_cache(model.graph_io, model.kv_layout, capacity, model.device)
        self.fed = 0  # tokens run through the graph over this decoder's life
        self._logits = aligned_zeros((1, 1, model.vocab_size), np.float32)  # (batch, keep, vocab)
        self._keeps_last = model.graph_io.has_logits_to_keep
        for name, keep in model.graph_io.keep(1).items():  # bound by pointer: verify() changes its value
            self._keep = keep
            self.binding.bind_input(name, "cpu", 0, np.int64, list(keep.shape), keep.ctypes.data)
        self._bind_logits()  # bound first: the cache's presents follow it in get_outputs()

    @property
    def tokens(self) -> np.ndarray:
        """(length,) int64: what the cache holds."""
        return self.cache.tokens

    def _bind_logits(self) -> None:
        self.binding.bind_output(io.LOGITS, "cpu", 0, np.float32, list(self._logits.shape), self._logits.ctypes.data)

    def decode_one(self, token: int) -> np.ndarray:
        """(vocab,) float32 logits after one more token."""
        cache, binding = self.cache, self.binding
        cache.stage((token,))
        cache.bind(binding, 1)
        self._bind_logits()
        self.session.run_with_iobinding(binding)
        cache.advance(1, binding)
        self.fed += 1
        return self._logits[0, 0]

    def prefill(self, tokens: Sequence[int]) -> np.ndarray:
        """(vocab,) float32 logits after the last of `tokens`, appended to what the cache holds."""
        logits = None
        for start in range(0, len(tokens), PREFILL_CHUNK):
            logits = self._forward(tokens[start:start + PREFILL_CHUNK])
        return logits

    def _forward(self, chunk: Sequence[int]) -> np.ndarray:
        cache, binding = self.cache, self.binding
        n = cache.stage(chunk)
        cache.bind(binding, n)
        if self._keeps_last:
            self._bind_logits()
        else:  # (1, n, vocab): let ORT allocate it
            binding.bind_output(io.LOGITS, "cpu")
        self.session.run_with_iobinding(binding)
        logits = self._logits if self._keeps_last else binding.get_outputs()[0].numpy()
        cache.advance(n, binding)
        self.fed += n
        return logits[0, -1]

    def verify(self, tokens: Sequence[int]) -> np.ndarray:
        """(len(tokens), vocab) float32: the logits after each of `tokens`, fed in one run
        (a token and the drafts that follow it, checked at once)."""
        cache, binding = self.cache, self.binding
        n = cache.stage(tokens)
        cache.bind(binding, n)
        if self._keeps_last:
            self._keep[...] = n
        binding.bind_output(io.LOGITS, "cpu")
        try:
            self.session.run_with_iobinding(binding)
        finally:
            if self._keeps_last:
                self._keep[...] = 1
        rows = binding.get_outputs()[0].numpy()[0, -n:]
        cache.advance(n, binding)
        self.fed += n
        return rows

    def reuse(self, prompt: Sequence[int]) -> int:
        """Keep the longest cached prefix of `prompt` (all but its last token at most, whose
        logits are needed) and drop the rest; returns how many tokens of it are held."""
        common = common_prefix(self.tokens, np.asarray(prompt[: max(len(prompt) - 1, 0)], np.int64))
        self.cache.trim_to(common)
        return common

    def release(self) -> None:
        """Let go of what the IO binding still holds from the last run: a concat cache's
        previous pasts (bound as inputs, as big as the cache: a kept decoder measured 2.2x its
        buffers' bytes in RSS) and an allocated logits output. Every step binds both again."""
        self.cache.bind(self.binding, 0)  # pasts: what the cache holds now
        self.binding.bind_output(io.LOGITS, "cpu")


def common_prefix(held: np.ndarray, prompt: np.ndarray) -> int:
    """How many leading tokens the two share."""
    n = min(len(held), len(prompt))
    differ = np.flatnonzero(held[:n] != prompt[:n])
    return int(differ[0]) if len(differ) else n
