"""`--via optimum` without optimum: what the native path refuses and suggests, what --via
refuses, and `quantize` on the weight layouts optimum's graphs use (built by hand here; the
real optimum graphs are tested in tests/test_via_optimum.py, in optimum's own venv).
"""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from edgellama.buildkit.quant_options import QuantOptions
from edgellama.buildkit.schemes import quantize
from edgellama.cli import main
from edgellama.quantize.rewrite import quantize_folder
from edgellama.runtime.contract import Manifest

RNG = np.random.default_rng(7)
HAS_OPTIMUM = importlib.util.find_spec("optimum") is not None and importlib.util.find_spec("optimum.exporters") is not None


def _export(*args: str):
    return CliRunner().invoke(main, ["export", *map(str, args)])


def _hf_folder(tmp_path, architecture: str):
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architectures": [architecture], "model_type": "phi3"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def test_native_export_of_another_architecture_suggests_via_optimum(tmp_path):
    r = _export(_hf_folder(tmp_path, "Phi3ForCausalLM"), tmp_path / "out")
    assert r.exit_code == 1 and "Traceback" not in r.output
    assert "'Phi3ForCausalLM' is not supported by the native exporter" in r.stderr
    assert "--via optimum" in r.stderr and "pip install 'optimum-onnx>=0.1'" in r.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_OPTIMUM, reason="optimum is installed here")
def test_via_optimum_without_optimum_says_what_to_install(tmp_path):
    r = _export(_hf_folder(tmp_path, "Phi3ForCausalLM"), tmp_path / "out", "--via", "optimum")
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert r.stderr.count("\n") == 1 and "pip install 'optimum-onnx>=0.1'" in r.stderr
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"]


def test_via_optimum_refusals(tmp_path):
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    r = _export(gguf, tmp_path / "out", "--via", "optimum")
    assert r.exit_code == 2 and "reads Hugging Face folders" in r.stderr
    r = _export(_hf_folder(tmp_path, "Phi3ForCausalLM"), tmp_path / "out", "--via", "optimum", "--attention", "gqa")
    assert r.exit_code == 2 and "--attention gqa applies to the native exporter" in r.stderr
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "x", "auto_map": {"AutoModel": "m.M"}}))
    r = _export(tmp_path / "hf", tmp_path / "out", "--via", "optimum")
    assert r.exit_code == 1 and "never runs" in r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf", "m.gguf"]


# ---- quantize on optimum's weight layouts --------------------------------------------------

K, N, VOCAB, SEQ = 64, 48, 80, 3


def _foreign_graph(folder):
    """MatMul on a (K, N) weight, shared by a second MatMul; MatMul through Transpose of an (N, K)
    weight; Gemm transB=1 with a bias; Gemm transB=0; an lm_head MatMul of width VOCAB."""
    w = {name: RNG.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in
         [("w_kn", (K, N)), ("w_nk", (N, K)), ("w_gemm", (N, K)), ("w_gemm_kn", (K, N)), ("w_head", (K, VOCAB))]}
    w["bias"] = RNG.standard_normal(N).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w_kn"], ["y_kn"]),
        helper.make_node("MatMul", ["x2", "w_kn"], ["y_shared"]),
        helper.make_node("Transpose", ["w_nk"], ["w_nk_t"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "w_nk_t"], ["y_nk"]),
        helper.make_node("Gemm", ["x2", "w_gemm", "bias"], ["y_gemm"], transB=1),
        helper.make_node("Gemm", ["x2", "w_gemm_kn"], ["y_gemm_kn"]),
        helper.make_node("MatMul", ["x", "w_head"], ["logits"]),
    ]
    f = TensorProto.FLOAT
    outputs = [helper.make_tensor_value_info(n, f, None) for n in ("y_kn", "y_shared", "y_nk", "y_gemm", "y_gemm_kn", "logits")]
    graph = helper.make_graph(nodes, "foreign", [helper.make_tensor_value_info("x", f, [1, SEQ, K]),
                                                 helper.make_tensor_value_info("x2", f, [SEQ, K])],
                              outputs, [numpy_helper.from_array(a, n) for n, a in w.items()])
    folder.mkdir()
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(folder / "model.onnx"))
    manifest = Manifest(architecture="Test", num_layers=1, hidden_size=K, num_heads=1, num_kv_heads=1, head_dim=K,
                        vocab_size=VOCAB, context_length=16, dtype="fp32", weights="fp32", attention="standard",
                        kv_buffer="concat", bos_token_id=None, eos_token_ids=[], add_bos_token=False, via="optimum")
    (folder / "edgellama.json").write_text(manifest.to_json())
    return w


def test_quantize_recognises_optimum_weight_layouts(tmp_path):
    w = _foreign_graph(tmp_path / "float")
    q = quantize_folder(tmp_path / "float", tmp_path / "q", QuantOptions(bits=8, lm_head="int4", accuracy_level=0,
                                                                               calibrate=False))
    graph = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == 6 and "Gemm" not in ops
    # no Transpose of a float weight is left; the only ones turn float-min offsets (folded at load)
    assert all(n.input[0].endswith((".mins", ".mins.centred")) for n in graph.node if n.op_type == "Transpose")
    assert q.quantization["quantized_weights"] == 5  # the shared weight once
    assert sum(t.name.endswith(".qweight") for t in graph.initializer) == 5
    assert not {t.name for t in graph.initializer} & {"w_kn", "w_nk", "w_gemm", "w_gemm_kn", "w_head"}

    x = RNG.standard_normal((1, SEQ, K)).astype(np.float32)
    x2 = RNG.standard_normal((SEQ, K)).astype(np.float32)
    sess = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), providers=["CPUExecutionProvider"])
    got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x, "x2": x2})))

    def deq(m, bits):  # m: (N, K) as the graph multiplies by its transpose
        return quantize(m, bits, 32, "mse-asymmetric").with_half_scales().dequantize().T  # 2-byte scales as written

    expected = {"y_kn": x @ deq(w["w_kn"].T, 8), "y_shared": x2 @ deq(w["w_kn"].T, 8),
                "y_nk": x @ deq(w["w_nk"], 8), "y_gemm": x2 @ deq(w["w_gemm"], 8) + w["bias"],
                "y_gemm_kn": x2 @ deq(w["w_gemm_kn"].T, 8), "logits": x @ deq(w["w_head"].T, 4)}
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, atol=1e-4, err_msg=name)
