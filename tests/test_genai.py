"""onnxruntime-genai loads an exported folder as is (genai_config.json, tokenizer.json)."""

from __future__ import annotations

import pytest

from conftest import PROMPT_IDS
from edgellama.runtime.model import Model

og = pytest.importorskip("onnxruntime_genai")
pytestmark = pytest.mark.slow  # both load the exported SmolLM2


def test_genai_greedy_equals_ours(smollm2_onnx):
    genai_model = og.Model(str(smollm2_onnx))
    params = og.GeneratorParams(genai_model)
    params.set_search_options(max_length=len(PROMPT_IDS) + 32, do_sample=False)
    generator = og.Generator(genai_model, params)
    generator.append_tokens(PROMPT_IDS)
    theirs = []
    while not generator.is_done():
        generator.generate_next_token()
        theirs.append(int(generator.get_next_tokens()[0]))

    ours = Model.load(smollm2_onnx, threads=2).generate(PROMPT_IDS, max_new_tokens=32, ignore_eos=True)
    assert [s.token_id for s in ours if s.token_id is not None] == theirs


def test_genai_tokenizer_reads_our_tokenizer_json(smollm2_onnx):
    tok = og.Tokenizer(og.Model(str(smollm2_onnx)))
    assert tok.encode("The best thing about AI is its ability to").tolist() == PROMPT_IDS
