"""The prompt cache: a generation that starts from a cached prefix (taken whole, forked in
part, or gone because it was evicted) gives exactly the tokens of a cold one, for both KV
layouts, and generations running at once never share a buffer."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from edgellama.runtime.contract import KVLayout
from edgellama.runtime.decoder import Decoder, common_prefix
from edgellama.runtime.generate import Generation
from edgellama.runtime.model import make_config
from edgellama.runtime.prompt_cache import MIN_FORK_SHARE, PromptCache, default_cache_bytes, kv_bytes_per_token

SYSTEM = {"role": "system", "content": "You are the quick brown fox. You jump over the lazy dog. def f(x): return x"}
BIG = 64 * 2**20


@pytest.fixture(scope="module", params=list(KVLayout), ids=lambda k: k.value)
def model(request, tmp_path_factory):
    from conftest import tiny_model_of_layout

    return tiny_model_of_layout(tmp_path_factory, request.param)


def chat(model, *turns: str, system: bool = True) -> list[int]:
    """Token ids of a conversation: user, assistant, user, ... (ending with a user turn)."""
    roles = ["user", "assistant"] * len(turns)
    messages = ([SYSTEM] if system else []) + [{"role": r, "content": t} for r, t in zip(roles, turns)]
    return model.render_chat(messages)


def cold(model, ids, **options) -> tuple[list[int], str]:
    gen = model.generate(ids, **{"max_new_tokens": 8, "temperature": 0, **options})
    return [s.token_id for s in gen if s.token_id is not None], gen.text


def cached(cache: PromptCache, ids, **options) -> tuple[list[int], str, int]:
    """(tokens, text, prompt tokens that came from the cache)."""
    config = make_config(**{"max_new_tokens": 8, "temperature": 0, **options})
    decoder = cache.decoder_for(ids, len(ids) + config.max_new_tokens)
    reused = decoder.cache.length
    gen = Generation(cache.model, ids, config, decoder=decoder)
    tokens = [s.token_id for s in gen if s.token_id is not None]
    cache.store(gen.decoder)
    return tokens, gen.text, reused


def test_chat_turns_shared_system_prompt_and_eviction_equal_cold(model):
    cache = PromptCache(model, BIG)
    first = chat(model, "The quick brown fox")
    tokens, text, reused = cached(cache, first)
    assert (tokens, text) == cold(model, first) and reused == 0

    # The next turn. (The reply's text may not encode to the tokens generated: then the part
    # that does is forked rather than the whole entry taken.)
    second = chat(model, "The quick brown fox", text, "jumps over")
    tokens, text2, reused = cached(cache, second)
    assert (tokens, text2) == cold(model, second) and reused >= len(first)

    other = chat(model, "def f(x):")  # same system prompt, another user: a fork of its part
    tokens, text, reused = cached(cache, other)
    assert (tokens, text) == cold(model, other)
    assert len(other) // 2 < reused < len(other)
    # the entries it could fork from are intact: continuing that conversation is still exact
    third = chat(model, "The quick brown fox", text2, "jumps over", "lazy", "dog")
    tokens, _, reused = cached(cache, third, temperature=0.9, seed=5, presence_penalty=1.0)
    assert tokens == cold(model, third, temperature=0.9, seed=5, presence_penalty=1.0)[0] and reused >= len(first)


def test_an_evicted_prefix_is_prefilled_again_with_the_same_output(model):
    one = PromptCache(model, BIG)
    a, b = chat(model, "The quick brown fox", system=False), chat(model, "def f(x):", system=False)
    cached(one, a)
    size = one.bytes
    cache = PromptCache(model, int(size * 1.5))  # room for one entry of this size
    cached(cache, a)
    cached(cache, b)  # evicts a
    assert cache.stats()["evicted"] == 1 and len(cache) == 1
    again = chat(model, "The quick brown fox", cold(model, a)[1], "jumps", system=False)
    tokens, text, reused = cached(cache, again)
    assert reused == common_prefix(np.array(a), np.array(b))  # only what b shares with it
    assert (tokens, text) == cold(model, again)
    too_small = PromptCache(model, size - 1)
    cached(too_small, a)
    assert len(too_small) == 0


def test_a_taken_entry_is_the_decoder_itself_and_a_fork_shares_no_buffer(model):
    cache = PromptCache(model, BIG)
    ids = chat(model, "The quick brown fox")
    dec = Decoder(model, 64)
    dec.prefill(ids)
    cache.store(dec)
    assert cache.decoder_for(ids + [5, 6]) is dec and len(cache) == 0  # taken: out of the cache
    cache.store(dec)
    fork = cache.decoder_for(ids[:-4] + [7, 8])
    assert fork is not dec and len(cache) == 1 and fork.cache.length == len(ids) - 4
    if model.kv_layout is KVLayout.SHARED:  # the graph writes these in place
        ours = [fork.cache._array(p) for p in fork.cache._values]
        theirs = [dec.cache._array(p) for p in dec.cache._values]
        assert not any(np.shares_memory(x, y) for x in ours for y in theirs)
    assert not np.shares_memory(fork.cache.ids, dec.cache.ids)
    held = dec.tokens.copy()
    fork.prefill([7, 8, 9])
    assert list(dec.tokens) == list(held)


def test_store_keeps_the_longest_and_counts_real_bytes(model):
    cache = PromptCache(model, BIG)
    ids = chat(model, "The quick brown fox")
    short, long = Decoder(model, 100), Decoder(model, 100)
    short.prefill(ids[:10])
    long.prefill(ids)
    cache.store(short)
    cache.store(long)  # short is a prefix of it: superseded
    assert len(cache) == 1 and cache.bytes == long.cache.nbytes
    again = Decoder(model, 100)
    again.prefill(ids[:12])
    cache.store(again)  # long already holds all of it
    assert len(cache) == 1 and cache.decoder_for(ids + [3]) is long
    per_token = kv_bytes_per_token(model)
    assert per_token == 2 * 2 * 2 * 16 * 4  # layers, K and V, kv heads, head_dim, float32
    if model.kv_layout is KVLayout.SHARED:  # preallocated: counted by capacity, not length
        assert long.cache.nbytes == 100 * (per_token + 16)
    else:
        assert long.cache.nbytes == len(ids) * per_token + 100 * 16
    assert default_cache_bytes(model) == 4 * model.context_length * per_token
    off = PromptCache(model, 0)
    for _ in off.generate(ids, max_new_tokens=2):
        pass
    assert len(off) == 0 and off.decoder_for(ids).cache.length == 0


def test_a_short_match_with_a_long_entry_is_not_worth_its_copy(model):
    cache = PromptCache(model, BIG)
    long = chat(model, "The quick brown fox jumps over the lazy dog. " * 3)
    cached(cache, long)
    held = len(long) + 7  # the prompt and the generated tokens but the last
    worth = math.ceil(held * MIN_FORK_SHARE)
    other = lambda n: long[:n] + [(long[n] + 1) % 300, 5, 6]  # noqa: E731
    assert cache.decoder_for(other(worth - 1)).cache.length == 0 and cache.stats()["misses"] == 2
    assert cache.decoder_for(other(worth)).cache.length == worth and cache.stats()["hits"] == 1


def test_concurrent_generations_sharing_a_prefix_equal_sequential_cold(model):
    turns = ["The quick brown fox", "def f(x):", "return x * 2", "lazy dog", "jumps over", "The quick"]
    prompts = [chat(model, t) for t in turns]
    prompts += [chat(model, turns[0], cold(model, prompts[0])[1], "more")]  # extends the first
    prompts += [p[:-1] + [9] for p in prompts[:3]]  # the same, but for the last token
    options = [dict(temperature=0.7, seed=i, max_new_tokens=12) for i in range(len(prompts))]
    expected = [cold(model, p, **o)[0] for p, o in zip(prompts, options)]
    cache = PromptCache(model, BIG)
    start = threading.Barrier(4)

    def run(i: int) -> list[int]:
        if i < 4:
            start.wait(10)  # the first four together, before anything is cached
        return cached(cache, prompts[i], **options[i])[0]

    for _ in range(2):  # the second round finds the first's entries
        with ThreadPoolExecutor(4) as pool:
            assert list(pool.map(run, range(len(prompts)))) == expected
    assert cache.stats()["hits"] >= len(prompts)
