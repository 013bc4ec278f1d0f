"""Sampling: each processor against hand-computed distributions, penalties against
HF semantics, seeded reproducibility (in and across processes), argument checks."""

import json
import math
import os
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgellama.runtime import sampling as S
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.sampling import SamplingParams, make_sampler, top_probs

# A 5-token vocab whose softmax is exactly these probabilities.
P5 = np.array([0.5, 0.2, 0.15, 0.1, 0.05])
L5 = np.log(P5)
NO_HISTORY = np.zeros(0, dtype=np.int64)


def probs_after(processor, logits=L5, history=NO_HISTORY):
    return S.softmax(processor(np.asarray(logits, dtype=np.float64), history))


def frequencies(params, logits=L5, n=20000, history=NO_HISTORY):
    sampler = make_sampler(params)
    draws = [sampler(logits.astype(np.float32), history) for _ in range(n)]
    return np.bincount(draws, minlength=len(logits)) / n


# --- filters on the tiny vocab -------------------------------------------------------------------


@pytest.mark.parametrize(
    "processor, expected",
    [
        (S.top_k(1), [1, 0, 0, 0, 0]),
        (S.top_k(2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        (S.top_k(5), P5),
        (S.top_k(50), P5),
        # top_p: keep while the mass strictly before the token is < p
        (S.top_p(0.4), [1, 0, 0, 0, 0]),
        (S.top_p(0.6), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        (S.top_p(0.8), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (S.top_p(0.97), P5),
        # min_p: keep prob >= m * 0.5
        (S.min_p(0.25), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (S.min_p(0.35), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        (S.min_p(0.9), [1, 0, 0, 0, 0]),
        (S.min_p(0.05), P5),
    ],
)
def test_filter_exact_distribution(processor, expected):
    np.testing.assert_allclose(probs_after(processor), expected, rtol=1e-12, atol=1e-15)


def test_temperature_exact_distribution():
    for t in (0.5, 2.0):
        expected = P5 ** (1 / t) / (P5 ** (1 / t)).sum()
        np.testing.assert_allclose(probs_after(S.temperature(t)), expected, rtol=1e-12)


def test_masked_tokens_are_minus_inf():
    out = S.top_k(2)(L5.copy(), NO_HISTORY)
    assert np.isneginf(out[2:]).all() and np.isfinite(out[:2]).all()


def test_top_k_keeps_ties_like_hf():
    logits = np.array([3.0, 1.0, 2.0, 2.0, 0.0])
    assert np.isfinite(S.top_k(2)(logits, NO_HISTORY)).tolist() == [True, False, True, True, False]


def test_chain_order_top_k_then_top_p_then_min_p():
    # top_k(3) renormalizes to [.5,.2,.15]/.85 = [.588,.235,.176]; top_p(0.7) then keeps
    # the first two (mass before the third is .824 >= .7); min_p(0.45) drops .235 < .45*.588.
    chain = S.build_processors(SamplingParams(temperature=1.0, top_k=3, top_p=0.7, min_p=0.45))
    x = L5.copy()
    for process in chain:
        x = process(x, NO_HISTORY)
    np.testing.assert_allclose(S.softmax(x), [1, 0, 0, 0, 0])
    chain = S.build_processors(SamplingParams(temperature=1.0, top_k=3, top_p=0.7))
    x = L5.copy()
    for process in chain:
        x = process(x, NO_HISTORY)
    np.testing.assert_allclose(S.softmax(x), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0])


@pytest.mark.parametrize(
    "params, expected",
    [
        (SamplingParams(temperature=1.0, seed=1), P5),
        (SamplingParams(temperature=1.0, top_k=2, seed=2), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
        (SamplingParams(temperature=1.0, top_p=0.8, seed=3), [0.5 / 0.85, 0.2 / 0.85, 0.15 / 0.85, 0, 0]),
        (SamplingParams(temperature=1.0, min_p=0.35, seed=4), [0.5 / 0.7, 0.2 / 0.7, 0, 0, 0]),
    ],
)
def test_sampler_frequencies_match(params, expected):
    freq = frequencies(params)
    expected = np.asarray(expected)
    assert (freq[expected == 0] == 0).all()  # filtered tokens are never drawn
    np.testing.assert_allclose(freq, expected, atol=0.015)  # ~4 sigma at n=20000


# --- filters against transformers' warpers on random logits --------------------------------------


def hf_mask(warper, logits):
    torch = pytest.importorskip("torch")
    scores = torch.tensor(logits, dtype=torch.float64)[None]
    return np.isfinite(warper(None, scores)[0].numpy())


@pytest.mark.parametrize(
    "seed, vocab, scale",
    [(0, 3000, 3.0), (1, 3000, 3.0), (2, 3000, 0.3), (3, 49152, 1.0), (4, 49152, 6.0), (5, 128256, 2.0)],
)
def test_filters_match_transformers(seed, vocab, scale):
    # flat (small scale) to peaked (large scale): exercises every head size of _head
    gen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(seed)
    logits = rng.standard_normal(vocab) * scale
    logits[rng.integers(0, vocab, 10)] += 8
    for ours, theirs in [
        (S.top_k(1), gen.TopKLogitsWarper(1)),
        (S.top_k(1000), gen.TopKLogitsWarper(1000)),
        (S.top_k(37), gen.TopKLogitsWarper(37)),
        (S.top_p(0.9), gen.TopPLogitsWarper(0.9)),
        (S.top_p(0.3), gen.TopPLogitsWarper(0.3)),
        (S.min_p(0.05), gen.MinPLogitsWarper(0.05)),
    ]:
        np.testing.assert_array_equal(np.isfinite(ours(logits, NO_HISTORY)), hf_mask(theirs, logits))


# --- penalties --------------------------------------------------------------------------------------

LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -2.0])
HISTORY = np.array([0, 1, 1, 4], dtype=np.int64)


def test_repetition_penalty_hand_computed():
    # seen: 0 (positive: / 2), 1 and 4 (negative: * 2); 2 and 3 unseen
    out = S.repetition_penalty(2.0)(LOGITS, HISTORY)
    np.testing.assert_array_equal(out, [1.0, -2.0, 0.5, 3.0, -4.0])


def test_presence_frequency_penalty_hand_computed():
    # token 0 seen once, 1 twice, 4 once: logit -= count * 0.25 + 0.5
    out = S.presence_frequency_penalty(0.5, 0.25)(LOGITS, HISTORY)
    np.testing.assert_allclose(out, [1.25, -2.0, 0.5, 3.0, -2.75])


def test_penalties_do_not_touch_the_input():
    before = LOGITS.copy()
    S.repetition_penalty(1.3)(LOGITS, HISTORY)
    S.presence_frequency_penalty(0.5, 0.5)(LOGITS, HISTORY)
    np.testing.assert_array_equal(LOGITS, before)


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_matches_transformers(penalty):
    torch = pytest.importorskip("torch")
    gen = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(1000) * 4  # both signs
    history = rng.integers(0, 1000, 300)  # with repeats
    theirs = gen.RepetitionPenaltyLogitsProcessor(penalty)(
        torch.tensor(history)[None], torch.tensor(logits)[None]
    )[0].numpy()
    np.testing.assert_allclose(S.repetition_penalty(penalty)(logits, history), theirs, rtol=1e-15)


def test_greedy_applies_repetition_penalty():
    logits = np.array([1.0, 5.0, 4.0], dtype=np.float32)
    history = np.array([1], dtype=np.int64)
    assert make_sampler(SamplingParams())(logits, history) == 1
    assert make_sampler(SamplingParams(repetition_penalty=1.5))(logits, history) == 2  # 5/1.5 < 4
    assert make_sampler(SamplingParams(presence_penalty=2.0))(logits, history) == 2


def test_greedy_fast_path_is_argmax_and_skips_filters():
    params = SamplingParams(top_k=3, top_p=0.5, min_p=0.2)  # temperature 0
    assert S.build_processors(params) == []
    rng = np.random.default_rng(0)
    for _ in range(20):
        logits = rng.standard_normal(1000).astype(np.float32)
        assert make_sampler(params)(logits, NO_HISTORY) == int(np.argmax(logits))


def test_sampler_does_not_modify_logits():
    logits = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    before = logits.copy()
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, min_p=0.01, repetition_penalty=1.2, seed=0)
    make_sampler(params)(logits, np.arange(50))
    np.testing.assert_array_equal(logits, before)


# --- reproducibility --------------------------------------------------------------------------------

REPRO_SCRIPT = """
import json, numpy as np
from edgellama.runtime.sampling import SamplingParams, make_sampler
rng = np.random.default_rng(123)
s = make_sampler(SamplingParams(temperature=0.9, top_p=0.95, top_k=500, seed={seed}))
hist = []
for _ in range(64):
    hist.append(s((rng.standard_normal(49152) * 2).astype(np.float32), np.array(hist, dtype=np.int64)))
print(json.dumps(hist))
"""


def run_sequence(seed):
    ns = {}
    exec(REPRO_SCRIPT.replace("print(json.dumps(hist))", "").format(seed=seed), ns)
    return ns["hist"]


def test_same_seed_same_tokens():
    assert run_sequence(7) == run_sequence(7)
    assert run_sequence(7) != run_sequence(8)


def test_same_seed_same_tokens_across_processes():
    env = {**os.environ, "PYTHONHASHSEED": "random"}
    out = subprocess.run(
        [sys.executable, "-c", REPRO_SCRIPT.format(seed=7)], capture_output=True, text=True, env=env, check=True
    )
    assert json.loads(out.stdout) == run_sequence(7)


# --- pieces ------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 20000),
    st.floats(0, 1, exclude_max=True),
    st.floats(0, 0.99),
    st.integers(0, 2**32),
)
def test_inverse_cdf_matches_naive_cumsum(n, frac, zero_share, seed):
    rng = np.random.default_rng(seed)
    w = rng.random(n) * (rng.random(n) >= zero_share)  # many zero weights, whole zero blocks
    if w.sum() == 0:
        w[rng.integers(n)] = 1.0
    i = S._inverse_cdf(w, frac)
    assert w[i] > 0
    # i's CDF interval holds u (up to the rounding of summing in blocks)
    cdf = np.cumsum(w)
    u, eps = frac * cdf[-1], 1e-9 * cdf[-1]
    assert cdf[i] - w[i] <= u + eps and u - eps < cdf[i]


def test_sampler_frequencies_across_cdf_blocks():
    # mass on both sides of the 4096-token block edges of the blocked CDF search
    logits = np.full(10000, -np.inf)
    expected = {4095: 0.3, 4096: 0.2, 8191: 0.1, 8192: 0.15, 9999: 0.25}
    for i, p in expected.items():
        logits[i] = math.log(p)
    freq = frequencies(SamplingParams(temperature=1.0, seed=5), logits)
    np.testing.assert_allclose(freq[list(expected)], list(expected.values()), atol=0.015)
    assert freq[list(expected)].sum() == 1.0


def test_top_probs_exact():
    got = top_probs(L5.astype(np.float32), 3)
    assert [i for i, _ in got] == [0, 1, 2]
    np.testing.assert_allclose([p for _, p in got], [0.5, 0.2, 0.15], rtol=1e-6)


def test_top_probs_edges():
    assert top_probs(L5, 0) == []
    assert [i for i, _ in top_probs(L5, 10)] == [0, 1, 2, 3, 4]
    assert [i for i, _ in top_probs(np.array([1.0, 2.0, 2.0, 2.0]), 2)] == [1, 2]  # ties by id
    with pytest.raises(BadArgumentError, match="k"):
        top_probs(L5, -1)


def test_top_probs_large_vocab_matches_full_sort():
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal(49152) * 2).astype(np.float32)
    probs = S.softmax(logits.astype(np.float64))
    expected = np.argsort(-probs, kind="stable")[:20]
    got = top_probs(logits, 20)
    assert [i for i, _ in got] == expected.tolist()
    assert math.isclose(sum(p for _, p in top_probs(logits, 49152)), 1.0, rel_tol=1e-9)


# --- argument checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", -0.1),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("temperature", "hot"),
        ("top_k", -1),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("top_p", -0.1),
        ("top_p", float("nan")),
        ("min_p", 1.0),
        ("min_p", -0.1),
        ("min_p", float("inf")),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("presence_penalty", float("nan")),
        ("frequency_penalty", float("-inf")),
        ("frequency_penalty", None),
        ("seed", -1),
        ("seed", 1.5),
    ],
)
def test_invalid_values_raise_naming_the_field(field, value):
    with pytest.raises(BadArgumentError) as err:
        SamplingParams(**{field: value})
    assert field in str(err.value) and repr(value) in str(err.value)


def test_valid_edges_accepted():
    SamplingParams(temperature=0, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1e-3, seed=0)
    SamplingParams(temperature=2, top_p=1e-9, min_p=0.999, presence_penalty=-2, frequency_penalty=2, seed=2**63)
    SamplingParams(top_k=np.int64(5), temperature=np.float32(0.5))
