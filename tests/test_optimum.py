"""The runtime runs graphs exported by `optimum-cli export onnx --task text-generation-with-past`.

optimum pins transformers 4.x, so the export is made in optimum's own venv by
tests/make_optimum_fixture.py (scripts/test.sh does this and sets EDGELLAMA_OPTIMUM_FIXTURE);
here, optimum itself may be importable instead.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from edgellama.runtime.model import Model


@pytest.fixture(scope="module")
def optimum_tiny(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    fixture = os.environ.get("EDGELLAMA_OPTIMUM_FIXTURE")
    if fixture:
        root = Path(fixture)
    else:
        pytest.importorskip("optimum.exporters.onnx")
        from make_optimum_fixture import main as make_fixture

        root = tmp_path_factory.mktemp("optimum")
        make_fixture(root)
    assert (root / "onnx" / "model.onnx").is_file(), f"optimum fixture missing under {root}"
    return root / "onnx", AutoModelForCausalLM.from_pretrained(root / "hf").eval()


def test_optimum_graph_greedy_matches_transformers(optimum_tiny):
    folder, reference = optimum_tiny
    model = Model.load(folder)
    assert model.manifest.kv_buffer == "concat" and model.graph_io.has_position_ids
    ids = [5, 6, 7, 8, 9, 10]
    gen = model.generate(ids, max_new_tokens=12, ignore_eos=True)
    ours = [s.token_id for s in gen if s.token_id is not None]
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                                 attention_mask=torch.ones(1, len(ids), dtype=torch.long))
    assert ours == out[0, len(ids):].tolist()


def test_optimum_graph_chat_template_and_logits(optimum_tiny):
    folder, reference = optimum_tiny
    model = Model.load(folder)
    ids = model.render_chat([{"role": "user", "content": "the quick fox"}])
    gen = model.generate(ids, max_new_tokens=1, show_probs=3)
    list(gen)
    with torch.no_grad():
        logits = reference(torch.tensor([ids])).logits[0, -1].numpy()
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    for tid, p in gen.prompt_top:
        assert abs(p - probs[tid]) < 1e-4
