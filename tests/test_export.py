"""Exported graphs against transformers on tiny random models (tolerance tier).

Each config: a 16-token prefill plus 8 single-token decode steps fed the plain way
(present -> next past, the mask growing), max |logits - reference| < 1e-4; and the
cached steps equal one uncached pass over the whole sequence.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from edgellama.exporter.export import ExportOptions, export
from edgellama.runtime import contract as io

PREFILL, STEPS, TOL = 16, 8, 1e-4

CONFIGS = {
    "gqa": dict(),
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "head_dim_32_ne_hidden_over_heads": dict(head_dim=32),  # 4 heads x 32 != 64
    "head_dim_24_standard_fallback": dict(head_dim=24),  # GQA needs head_dim % 16 == 0
    "tied_embeddings": dict(tie_word_embeddings=True),
    "rope_llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                        rope_theta=500000.0),
    "rope_linear": dict(rope_scaling={"rope_type": "linear", "factor": 4.0}),
    "rope_theta_500000": dict(rope_theta=500000.0),
    "llama_attention_and_mlp_bias": dict(attention_bias=True, mlp_bias=True),
    "qwen2_qkv_bias": dict(family="qwen2"),
    "mistral_sliding_window": dict(family="mistral", sliding_window=5),
}


def _session(folder):
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(folder / io.GRAPH_NAME), opts, providers=["CPUExecutionProvider"])


def run_plain(sess, ids: np.ndarray, chunks: list[int]) -> np.ndarray:
    """Feed `ids` (1, N) in chunks, present -> past; (1, N, V) logits."""
    meta = {i.name: i for i in sess.get_inputs()}
    kv, hd = meta[io.past_key(0)].shape[1], meta[io.past_key(0)].shape[3]
    dtype = np.float16 if meta[io.past_key(0)].type == "tensor(float16)" else np.float32
    layers = sum(1 for n in meta if n.endswith(".key"))
    past = {n(i): np.zeros((1, kv, 0, hd), dtype) for i in range(layers) for n in (io.past_key, io.past_value)}
    names = [o.name for o in sess.get_outputs()]
    pos, logits = 0, []
    for n in chunks:
        feeds = {io.INPUT_IDS: ids[:, pos:pos + n], io.ATTENTION_MASK: np.ones((1, pos + n), np.int64), **past}
        if io.LOGITS_TO_KEEP in meta:
            feeds[io.LOGITS_TO_KEEP] = np.array([0], np.int64)  # every position
        out = dict(zip(names, sess.run(None, feeds)))
        logits.append(out[io.LOGITS])
        past = {k.replace("present.", "past_key_values."): v for k, v in out.items() if k.startswith("present.")}
        pos += n
    return np.concatenate(logits, axis=1)


def _reference(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.numpy()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_tiny_model_matches_transformers(tiny_factory, tmp_path, name):
    overrides = dict(CONFIGS[name])
    folder, model = tiny_factory(name, overrides.pop("family", "llama"), **overrides)
    out = tmp_path / f"{name}-onnx"
    manifest = export(folder, out)
    expected_attention = "standard" if "standard" in name else "gqa"
    assert manifest.attention == expected_attention

    ids = np.random.default_rng(1).integers(0, 300, (1, PREFILL + STEPS))
    ref = _reference(model, ids)
    sess = _session(out)
    cached = run_plain(sess, ids, [PREFILL] + [1] * STEPS)
    assert np.abs(cached - ref).max() < TOL
    assert np.abs(ref).max() > 1.0  # logits large enough for the tolerance to mean something
    uncached = run_plain(sess, ids, [PREFILL + STEPS])
    np.testing.assert_allclose(cached, uncached, atol=TOL, rtol=0)


def test_standard_attention_when_asked(tiny_factory, tmp_path):
    folder, model = tiny_factory()
    manifest = export(folder, tmp_path / "std", ExportOptions(attention="standard"))
    assert manifest.attention == "standard" and manifest.kv_buffer == "concat"
    ids = np.random.default_rng(2).integers(0, 300, (1, 12))
    got = run_plain(_session(tmp_path / "std"), ids, [8, 1, 1, 1, 1])
    assert np.abs(got - _reference(model, ids)).max() < TOL


def test_sharded_safetensors(tiny_factory, tmp_path):
    folder, model = tiny_factory("sharded", max_shard_size="100KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    export(folder, tmp_path / "out")
    ids = np.arange(10)[None] + 5
    got = run_plain(_session(tmp_path / "out"), ids, [10])
    assert np.abs(got - _reference(model, ids)).max() < TOL


def test_fp16_export_close_to_fp32(tiny_factory, tmp_path):
    folder, model = tiny_factory()
    export(folder, tmp_path / "fp16", ExportOptions(dtype="fp16"))
    ids = np.random.default_rng(3).integers(0, 300, (1, 10))
    got = run_plain(_session(tmp_path / "fp16"), ids, [6, 1, 1, 1, 1])
    ref = _reference(model, ids)
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_lm_head_op_by_dtype(tiny_factory, tmp_path):
    """fp32: the logits come straight out of one FusedMatMul(transB) over the tied table (no
    Gemm + Reshape that would materialize and then copy a window's logits); fp16 (onnxruntime's
    CPU FusedMatMul is float32 only): Gemm(transB) between Reshapes. The table is stored once."""
    import onnx

    for tied, table in ((True, "embed.weight"), (False, "lm_head.weight")):
        folder, _ = tiny_factory(f"tied-{tied}", tie_word_embeddings=tied)
        for dtype, op in (("fp32", "FusedMatMul"), ("fp16", "Gemm")):
            out = tmp_path / f"{dtype}-{tied}"
            export(folder, out, ExportOptions(dtype=dtype))
            graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
            head = [n for n in graph.node if n.op_type in ("FusedMatMul", "Gemm", "MatMul") and table in n.input]
            assert [n.op_type for n in head] == [op]
            assert {a.name: a.i for a in head[0].attribute} == {"transB": 1}
            assert [i.name for i in graph.initializer if "embed" in i.name or "lm_head" in i.name] == \
                ["embed.weight"] + ([] if tied else ["lm_head.weight"])
            if op == "FusedMatMul":
                assert head[0].output[0] == "logits" and head[0].domain == "com.microsoft"


def test_output_folder_contents(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    out = tmp_path / "out"
    manifest = export(folder, out)
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["model.onnx", "model.onnx.data", "tokenizer.json", "tokenizer_config.json",
                            "chat_template.jinja", "edgellama.json", "genai_config.json"])
    saved = json.loads((out / "edgellama.json").read_text())
    assert saved["num_layers"] == 2 and saved["num_kv_heads"] == 2 and saved["head_dim"] == 16
    assert set(saved["source"]["sha256"]) == {"model.safetensors"}
    assert manifest.eos_token_ids == [1]
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["decoder"]["num_key_value_heads"] == 2
    assert genai["search"]["past_present_share_buffer"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_logits_to_keep_returns_the_last_positions(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    export(folder, tmp_path / "out")
    sess = _session(tmp_path / "out")
    ids = np.arange(7)[None] + 3
    full = run_plain(sess, ids, [7])
    past = {i.name: np.zeros((1, 2, 0, 16), np.float32) for i in sess.get_inputs() if i.name.startswith("past")}
    feeds = {io.INPUT_IDS: ids, io.ATTENTION_MASK: np.ones((1, 7), np.int64), **past}
    last2 = sess.run([io.LOGITS], {**feeds, io.LOGITS_TO_KEEP: np.array([2], np.int64)})[0]
    assert last2.shape == (1, 2, full.shape[-1])
    np.testing.assert_allclose(last2, full[:, -2:], atol=1e-5)


def test_rope_tables_are_folded_by_onnxruntime_to_the_same_values(tmp_path):
    """The exporter writes the rope tables as float64 ops on hd/2 frequencies (Range, Mul,
    Cos / Sin, Cast), which onnxruntime folds at load into exactly the tables numpy computes in
    float64 (the tables the exporter used to store); the file holds no (context, hd/2) table."""
    import io as _io

    import onnx
    import onnxruntime as ort
    from onnx import helper

    from edgellama.buildkit.graph_writer import OPSET, GraphWriter
    from edgellama.exporter.graph import _rope_table_nodes

    positions = 4096
    inv_freq = 1.0 / (500000.0 ** (np.arange(0, 64, 2, dtype=np.float64) / 64))
    g = GraphWriter(_io.BytesIO(), "unused.data")
    cos, sin = _rope_table_nodes(g, positions, inv_freq, np.dtype(np.float32), "rope")
    graph = helper.make_graph(g.nodes, "rope", [], [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, None)
                                                    for n in (cos, sin)], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    assert max(int(np.prod(t.dims)) for t in model.graph.initializer) == len(inv_freq)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})
    angles = np.arange(positions, dtype=np.float64)[:, None] * inv_freq[None, :]
    assert np.array_equal(got[0], np.cos(angles).astype(np.float32))
    assert np.array_equal(got[1], np.sin(angles).astype(np.float32))
