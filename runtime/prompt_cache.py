"""Keep the KV of recent generations; a new prompt starts from the longest cached prefix.

    cache = PromptCache(model, max_bytes=512 * 2**20)
    gen = cache.generate(model.render_chat(messages), max_new_tokens=64)   # stored when it ends
    # or, driving a Generation yourself:
    dec = cache.decoder_for(ids)            # holds the longest cached prefix of ids (maybe none)
    gen = Generation(model, ids, config, decoder=dec)
    ...; cache.store(gen.decoder)           # after it ends (or stops early): its KV goes back

A multi-turn chat then prefills only its new turn, and a system prompt shared by many
requests is prefilled once. Each entry is a Decoder (its KV cache and IO binding), keyed by
the tokens its cache holds. Entries are never run while cached; one goes out in one of two
ways, under the lock, so two requests never share a mutable buffer:

    taken   the prompt extends all the entry holds: the entry itself leaves the cache (no
            copy); what the generation stores back supersedes it anyway
    forked  the prompt shares only part of it (a system prompt, an edited turn): a copy
            (KVCache.fork) goes out, trimmed to the common prefix; the entry stays for others

Entries are counted by their buffers' bytes (a shared-layout cache holds `capacity`
positions, not `length`) and the least recently used go first beyond max_bytes. Decoders
out with requests are not counted: --max-concurrent bounds them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Sequence

import numpy as np

from .decoder import Decoder, common_prefix

if TYPE_CHECKING:
    from .generate import Generation, GenerationConfig
    from .model import Model

DEFAULT_CONTEXTS = 4  # the default holds this many full contexts' KV ...
DEFAULT_CAP = 2 * 2**30  # ... but never more than 2 GiB (Llama-3.2-1B fp32: 8 GiB a 128K context)
# A fork copies all the entry holds (KVCache.fork has no "first n only"), so a match shorter
# than this share of the entry is prefilled instead: on SmolLM2 int4 (2 threads, 1,500 held)
# forking costs ~1/130 of prefilling per token (0.03 vs 4.2 ms), so 1/32 still wins ~4x.
MIN_FORK_SHARE = 1 / 32


def kv_bytes_per_token(model: "Model") -> int:
    """Bytes of K and V one token takes across the layers (SmolLM2-135M fp32: 46,080)."""
    gio = model.graph_io
    return 2 * gio.num_layers * gio.num_kv_heads * gio.head_dim * gio.kv_dtype.itemsize


def default_cache_bytes(model: "Model") -> int:
    return min(DEFAULT_CONTEXTS * model.context_length * kv_bytes_per_token(model), DEFAULT_CAP)


class PromptCache:
    def __init__(self, model: "Model", max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.model, self.max_bytes = model, max_bytes
        self._entries: OrderedDict[int, tuple[Decoder, int]] = OrderedDict()  # id -> (decoder, bytes); LRU first
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = self.misses = self.evicted = 0

    def __len__(self) -> int:
        return len(self._entries)

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evicted": self.evicted}

    # ---- out ------------------------------------------------------------------------------
    def decoder_for(self, prompt_ids: Sequence[int], capacity: int = 0) -> Decoder:
        """A decoder of this caller's own, holding the longest cached prefix of prompt_ids
        (never all of it: the last token is fed for its logits), or a fresh one with room
        for `capacity` tokens. `decoder.cache.length` is how many prompt tokens it saves."""
        prompt = np.asarray(prompt_ids, np.int64)[: max(len(prompt_ids) - 1, 0)]
        with self._lock:
            key, common = self._best(prompt)
            decoder = self._take_or_fork(key, common) if key is not None else None
            self.hits, self.misses = self.hits + (decoder is not None), self.misses + (decoder is None)
        if decoder is None:
            return Decoder(self.model, max(capacity, len(prompt_ids)))
        decoder.cache.trim_to(common)  # the copy's own buffers (a forked concat cache copies its prefix here)
        return decoder

    def _best(self, prompt: np.ndarray) -> tuple[int | None, int]:
        """The entry sharing the most with prompt (ties: the shortest, the cheapest to copy),
        if it shares enough to be worth its copy."""
        best, best_rank = None, (0, 0)
        for key, (decoder, _) in self._entries.items():
            held = decoder.tokens
            common = common_prefix(held, prompt)
            rank = (common, -len(held))
            if common and rank > best_rank and (common == len(held) or common >= MIN_FORK_SHARE * len(held)):
                best, best_rank = key, rank
        return best, best_rank[0]

    def _take_or_fork(self, key: int, common: int) -> Decoder:
        decoder, nbytes = self._entries[key]
        if common == decoder.cache.length:
            del self._entries[key]
            self.bytes -= nbytes
            return decoder
        self._entries.move_to_end(key)
        return Decoder(self.model, 0, cache=decoder.cache.fork())

    # ---- back -----------------------------------------------------------------------------
    def store(self, decoder: Decoder) -> None:
        """Keep `decoder` (the caller must not use it again): entries holding a prefix of
        its tokens go, and so do the least recently used beyond max_bytes. Not kept if it
        holds nothing, if an entry already holds all it holds, or if it alone is too big."""
        held, nbytes = decoder.tokens, decoder.cache.nbytes
        if not len(held) or nbytes > self.max_bytes:
            return
        decoder.release()
        with self._lock:
            for key, (other, other_bytes) in list(self._entries.items()):
                same = common_prefix(other.tokens, held)
                if same == len(held):  # held by a longer (or equal) entry already
                    self._entries.move_to_end(key)
                    return
                if same == len(other.tokens):  # superseded
                    del self._entries[key]
                    self.bytes -= other_bytes
            self._entries[id(decoder)] = (decoder, nbytes)
            self.bytes += nbytes
            while self.bytes > self.max_bytes:
                _, (_, old_bytes) = self._entries.popitem(last=False)
                self.bytes -= old_bytes
                self.evicted += 1

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.bytes = 0

    # ---- convenience ----------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], config: "GenerationConfig | None" = None,
                 **options) -> "Generation":
        """As Model.generate, starting from the longest cached prefix; the generation is
        stored back when it ends (one abandoned midway is not)."""
        from .generate import Generation
        from .model import make_config

        config = config or make_config(**options)
        ids = self.model.encode(prompt) if isinstance(prompt, str) else list(prompt)
        decoder = self.decoder_for(ids, len(ids) + config.max_new_tokens)
        return Generation(self.model, ids, config, decoder=decoder,
                          on_finish=lambda gen: self.store(gen.decoder))
