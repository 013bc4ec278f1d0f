"""`edgellama export --via optimum`: architectures the native builder lacks, traced by optimum,
then run, quantized and benchmarked by edgellama.

optimum-onnx pins transformers 4.x while the main suite runs transformers 5, so
scripts/test.sh runs this file in .venv-optimum, where edgellama is installed with its
[optimum] extra; anywhere optimum is missing, the whole file is skipped.
"""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest

pytest.importorskip("optimum.exporters.onnx", reason="needs edgellama[optimum]; scripts/test.sh runs this "
                                                     "file in .venv-optimum")
import torch  # noqa: E402
from click.testing import CliRunner  # noqa: E402
from conftest import make_tiny  # noqa: E402

from edgellama.buildkit.quant_options import QuantOptions  # noqa: E402
from edgellama.cli import main  # noqa: E402
from edgellama.exporter.export import ExportOptions, export  # noqa: E402
from edgellama.quantize.rewrite import quantize_folder  # noqa: E402
from edgellama.runtime.decoder import Decoder  # noqa: E402
from edgellama.runtime.model import Model  # noqa: E402

# Phi-3: fused qkv and gate_up projections; Qwen3: q/k norms; Gemma: GeLU, scaled embeddings, tied table.
ARCHS = ["phi3", "qwen3", "gemma"]
IDS = [5, 17, 42, 7, 99, 3, 250, 11, 64, 128]  # a 5-token prompt, then 5 cached steps
PROMPT = "The quick brown fox"
# Relative RMS logits error against transformers after quantizing (block 32, mse, lm_head int8,
# float compute) these random tiny models (initializer_range 0.3, K = 64: random weights are the
# worst case for 4 bits); measured int4 0.31-0.36, int8 0.02-0.054.
QUANT_LOGITS_BOUND = {4: 0.5, 8: 0.1}
# fp16 weights, activations and KV cache against float32 transformers: measured max |diff|
# 0.017 on Qwen3's logits of up to 7.
FP16_LOGITS_ATOL = 0.05


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(family, dtype) -> (model folder, transformers model, HF folder); each exported once."""
    models, folders = {}, {}

    def get(family: str, dtype: str = "fp32"):
        if family not in models:
            hf = tmp_path_factory.mktemp(family) / "hf"
            models[family] = (hf, make_tiny(hf, family))
        hf, reference = models[family]
        if (family, dtype) not in folders:
            out = hf.parent / dtype
            export(hf, out, ExportOptions(via="optimum", dtype=dtype))
            folders[family, dtype] = out
        return folders[family, dtype], reference, hf

    return get


def cached_logits(folder, ids, prompt_len=5) -> np.ndarray:
    """(len(ids) - prompt_len + 1, vocab): the prompt's last logits, then one row per cached step."""
    model = Model.load(folder, threads=1)
    dec = Decoder(model, len(ids))
    rows = [dec.prefill(ids[:prompt_len]).copy()]
    rows += [dec.decode_one(t).copy() for t in ids[prompt_len:]]
    return np.stack(rows)


def reference_logits(reference, ids, prompt_len=5) -> np.ndarray:
    with torch.no_grad():
        return reference(torch.tensor([ids])).logits[0, prompt_len - 1:].numpy()


def greedy_reference(reference, ids, n) -> list[int]:
    with torch.no_grad():
        out = reference.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", ARCHS)
def test_logits_match_transformers_through_the_kv_cache(exported, family):
    folder, reference, _ = exported(family)
    manifest = json.loads((folder / "edgellama.json").read_text())
    assert manifest["via"] == "optimum" and manifest["kv_buffer"] == "concat"
    assert manifest["architecture"] == type(reference).__name__
    assert manifest["graph_io"]["inputs"]["past_key_values.{i}.key"] == "float32[batch_size, 2, past_sequence_length, 16]"
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    tables = [t.name for t in graph.initializer if manifest["vocab_size"] in t.dims]
    assert len(tables) == (1 if reference.config.tie_word_embeddings else 2)  # a tied table is stored once
    np.testing.assert_allclose(cached_logits(folder, IDS), reference_logits(reference, IDS), atol=1e-4, rtol=0)


@pytest.mark.parametrize("family", ARCHS)
def test_run_greedy_text_matches_transformers(exported, family):
    folder, reference, _ = exported(family)
    model = Model.load(folder)
    ids = model.encode(PROMPT)
    expected = greedy_reference(reference, ids, 12)
    r = CliRunner().invoke(main, ["run", str(folder), "--raw", "--prompt", PROMPT, "--max-new-tokens", "12", "--threads", "1"])
    assert r.exit_code == 0, r.output
    ours = [s.token_id for s in model.generate(PROMPT, max_new_tokens=12) if s.token_id is not None]
    assert ours == expected
    assert r.stdout == model.decode(expected) + "\n"


@pytest.mark.parametrize("family", ARCHS)
@pytest.mark.parametrize("bits", [4, 8])
def test_quantization_covers_every_weight_and_stays_close(exported, family, bits, tmp_path):
    folder, reference, _ = exported(family)
    out = tmp_path / f"int{bits}"
    manifest = quantize_folder(folder, out, QuantOptions(bits=bits, accuracy_level=0))
    float_graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    matrices = {t.name for t in float_graph.initializer if len(t.dims) == 2}
    projections = sum(n.op_type in ("MatMul", "FusedMatMul") and n.input[1] in matrices for n in float_graph.node)
    ops = [n.op_type for n in graph.node]
    assert ops.count("MatMulNBits") == projections and ops.count("GatherBlockQuantized") == 1
    assert not matrices & {t.name for t in graph.initializer}  # no float weight matrix is left
    tables = {n.input[0] for n in float_graph.node if n.op_type == "Gather" and n.input[0] in matrices}
    tied = any(n.op_type in ("MatMul", "FusedMatMul") and n.input[1] in tables for n in float_graph.node)
    assert manifest.quantization["quantized_weights"] == projections + (0 if tied else 1)  # a tied table: once
    widths = {a.i: b.i for n in graph.node if n.op_type == "MatMulNBits"
              for a in n.attribute if a.name == "N" for b in n.attribute if b.name == "bits"}
    assert widths.pop(manifest.vocab_size) == 8 and set(widths.values()) == {bits}  # the lm_head: --lm-head int8

    q, ref = cached_logits(out, IDS), reference_logits(reference, IDS)
    assert np.linalg.norm(q - ref) / np.linalg.norm(ref) < QUANT_LOGITS_BOUND[bits]


def test_llama_exported_both_ways_gives_the_same_greedy_tokens(tmp_path):
    make_tiny(tmp_path / "hf", "llama")
    native = export(tmp_path / "hf", tmp_path / "native")
    traced = export(tmp_path / "hf", tmp_path / "optimum", ExportOptions(via="optimum"))
    assert (native.via, native.kv_buffer) == ("native", "shared") and (traced.via, traced.kv_buffer) == ("optimum", "concat")
    tokens = []
    for folder in (tmp_path / "native", tmp_path / "optimum"):
        gen = Model.load(folder).generate(IDS[:5], max_new_tokens=16, ignore_eos=True)
        tokens.append([s.token_id for s in gen if s.token_id is not None])
    assert len(tokens[0]) == 16 and tokens[0] == tokens[1]
    np.testing.assert_allclose(cached_logits(tmp_path / "native", IDS), cached_logits(tmp_path / "optimum", IDS),
                               atol=1e-4, rtol=0)
    # The same weights, quantized from either graph's layout, are the same blocks (weight-only
    # fits: calibration statistics from two graphs differ in the last bits, and a scale's
    # rounding to float16 can tip on that).
    for name in ("native", "optimum"):
        quantize_folder(tmp_path / name, tmp_path / f"{name}-int4", QuantOptions(bits=4, accuracy_level=0,
                                                                                 calibrate=False))
    np.testing.assert_allclose(cached_logits(tmp_path / "native-int4", IDS),
                               cached_logits(tmp_path / "optimum-int4", IDS), atol=1e-4, rtol=0)


def test_fp16_export_keeps_float32_logits(exported):
    folder, reference, _ = exported("qwen3", "fp16")
    model = Model.load(folder)
    assert model.manifest.dtype == "fp16" and model.graph_io.kv_dtype == np.float16
    assert model.session.get_outputs()[0].type == "tensor(float)"
    np.testing.assert_allclose(cached_logits(folder, IDS), reference_logits(reference, IDS), atol=FP16_LOGITS_ATOL)


def test_export_with_bits_equals_quantize_of_the_float_export(exported, tmp_path):
    folder, _, hf = exported("phi3")
    export(hf, tmp_path / "direct", ExportOptions(via="optimum", quant=QuantOptions(bits=4)))
    quantize_folder(folder, tmp_path / "two-step", QuantOptions(bits=4))
    np.testing.assert_array_equal(cached_logits(tmp_path / "direct", IDS), cached_logits(tmp_path / "two-step", IDS))
    assert not list(tmp_path.glob(".*"))  # the float folder written on the way is gone


def test_chat_eval_and_bench_run_the_folder(exported, tmp_path):
    folder, reference, _ = exported("gemma")
    runner = CliRunner()
    r = runner.invoke(main, ["chat", str(folder), "--max-new-tokens", "4", "--threads", "1"], input="the fox\n/exit\n")
    assert r.exit_code == 0 and r.stdout.strip(), r.output

    text = "The quick brown fox jumps over the lazy dog. def f(x): return x * 2"
    (tmp_path / "t.txt").write_text(text)
    r = runner.invoke(main, ["eval", str(folder), "--text", str(tmp_path / "t.txt"), "--window", "64", "--json"])
    assert r.exit_code == 0, r.output
    ids = Model.load(folder).encode(text)
    with torch.no_grad():
        logp = torch.log_softmax(reference(torch.tensor([ids])).logits[0, :-1].double(), -1)
    expected = float(torch.exp(-logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].mean()))
    assert json.loads(r.stdout)["perplexity"] == pytest.approx(expected, rel=1e-4)

    r = runner.invoke(main, ["bench", str(folder), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1",
                             "--no-cold", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["decode_tok_s"]["median"] > 0


def test_onnxruntime_genai_runs_the_folder(exported):
    og = pytest.importorskip("onnxruntime_genai")
    folder, reference, _ = exported("qwen3")
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(IDS[:5]) + 8, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(IDS[:5])
    ours = []
    while not gen.is_done():
        gen.generate_next_token()
        ours.append(int(gen.get_next_tokens()[0]))
    assert ours == greedy_reference(reference, IDS[:5], 8)[:len(ours)] and ours


def test_olmo2_has_no_genai_config(exported):
    folder, _, _ = exported("olmo2")
    assert not (folder / "genai_config.json").exists()
    assert (folder / "tokenizer.json").is_file() and (folder / "chat_template.jinja").is_file()
