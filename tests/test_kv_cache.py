"""The cache core: rewind, trim_to and fork give the logits of recomputing from scratch,
for both layouts (shared buffer: GroupQueryAttention; concat: standard attention)."""

from __future__ import annotations

import numpy as np
import pytest

from edgellama.runtime.contract import KVLayout
from edgellama.runtime.decoder import Decoder
from edgellama.runtime.kv_cache import ConcatKVCache, SharedKVCache

PROMPT = [5, 17, 42, 99, 7, 123, 64, 250, 31, 8]


@pytest.fixture(scope="module", params=list(KVLayout), ids=lambda k: k.value)
def model(request, tmp_path_factory):
    from conftest import tiny_model_of_layout

    return tiny_model_of_layout(tmp_path_factory, request.param)


def fresh(model, tokens) -> np.ndarray:
    """(vocab,) logits after `tokens`, from an empty cache in one prefill."""
    return Decoder(model, 64).prefill(tokens).copy()


def feed(dec: Decoder, tokens) -> np.ndarray:
    logits = None
    for t in tokens:
        logits = dec.decode_one(t).copy()
    return logits


def test_layout_class(model):
    cls = SharedKVCache if model.kv_layout is KVLayout.SHARED else ConcatKVCache
    assert type(Decoder(model, 8).cache) is cls


def test_cached_steps_equal_recomputing(model):
    dec = Decoder(model, 4)  # too small on purpose: the cache grows as it goes
    dec.prefill(PROMPT[:3])
    for i in range(3, len(PROMPT)):
        np.testing.assert_allclose(dec.decode_one(PROMPT[i]), fresh(model, PROMPT[: i + 1]), atol=1e-4)
    assert list(dec.tokens) == PROMPT and dec.cache.length == len(PROMPT)


def test_rewind_then_continue_equals_recomputing(model):
    dec = Decoder(model, 32)
    dec.prefill(PROMPT)
    dec.cache.rewind(4)  # e.g. four rejected draft tokens
    assert dec.cache.length == len(PROMPT) - 4 and list(dec.tokens) == PROMPT[:-4]
    other = [200, 201, 202]
    np.testing.assert_allclose(feed(dec, other), fresh(model, PROMPT[:-4] + other), atol=1e-4)
    # a multi-token step after a rewind (how a verify step would run)
    dec.cache.rewind(2)
    np.testing.assert_allclose(dec.prefill([77, 78, 79]), fresh(model, PROMPT[:-4] + other[:1] + [77, 78, 79]),
                               atol=1e-4)


def test_trim_to_keeps_a_prefix(model):
    dec = Decoder(model, 32)
    dec.prefill(PROMPT)
    dec.cache.trim_to(3)
    np.testing.assert_allclose(dec.prefill([9, 10]), fresh(model, PROMPT[:3] + [9, 10]), atol=1e-4)
    dec.cache.trim_to(0)
    np.testing.assert_allclose(dec.prefill(PROMPT[:5]), fresh(model, PROMPT[:5]), atol=1e-4)


def test_fork_continues_two_ways_independently(model):
    dec = Decoder(model, len(PROMPT) + 2)
    dec.prefill(PROMPT)
    twin = Decoder(model, 0, cache=dec.cache.fork())
    a, b = [3, 4, 5, 6], [250, 249, 248, 247, 246, 245]  # b outgrows the capacity: its buffers grow
    logits_a = feed(dec, a)
    logits_b = feed(twin, b)
    logits_a2 = feed(dec, [11])  # going on with the first after the second moved
    np.testing.assert_allclose(logits_a, fresh(model, PROMPT + a), atol=1e-4)
    np.testing.assert_allclose(logits_b, fresh(model, PROMPT + b), atol=1e-4)
    np.testing.assert_allclose(logits_a2, fresh(model, PROMPT + a + [11]), atol=1e-4)
    assert list(dec.tokens) == PROMPT + a + [11] and list(twin.tokens) == PROMPT + b


def test_rewind_and_trim_refuse_going_forward(model):
    dec = Decoder(model, 16)
    dec.prefill(PROMPT[:4])
    with pytest.raises(ValueError):
        dec.cache.rewind(5)
    with pytest.raises(ValueError):
        dec.cache.trim_to(5)


def test_reuse_keeps_the_common_prefix(model):
    dec = Decoder(model, 32)
    dec.prefill(PROMPT)
    assert dec.reuse(PROMPT[:6] + [1, 2]) == 6 and dec.cache.length == 6
    assert dec.reuse(PROMPT[:6]) == 5  # the last prompt token is always fed: its logits are needed
