"""A tied table stored once, float16 storage of exact scales, presets and --size-budget."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

from edgellama.buildkit import quant_nodes
from edgellama.buildkit.graph_writer import MS, GraphWriter
from edgellama.buildkit.quant_options import PRESETS, QuantOptions
from edgellama.buildkit.schemes import quantize
from edgellama.cli import main
from edgellama.exporter.export import ExportOptions, export
from edgellama.quantize.rewrite import quantize_folder
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model
from edgellama.tools.evaluate import full_logits, log_softmax

RNG = np.random.default_rng(1)
CALIBRATION = 256  # tokens of the calibration text: enough for a 4-layer model, quick


def _table_graph(tmp_path, tables, shared: bool, h: int):
    """ids -> (embedding rows, logits of x against the table) from one or two written copies."""
    data_path = tmp_path / "w.data"
    with open(data_path, "wb") as data:
        g = GraphWriter(data, "w.data")
        first = quant_nodes.write_weight(g, tables, "table", np.dtype(np.float32))
        second = first if shared else quant_nodes.write_weight(g, tables, "head", np.dtype(np.float32))
        quant_nodes.gather_block_quantized(g, first, "ids", "table", np.float32, out="rows")
        quant_nodes.matmul_nbits(g, "x", second, "head", np.float32, 0, out="logits")
    graph = helper.make_graph(
        g.nodes, "t",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, None]),
         helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, None, h])],
        [helper.make_tensor_value_info("rows", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], g.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(MS, 1)])
    path = tmp_path / "t.onnx"
    onnx.save(model, str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session, data_path.stat().st_size


@pytest.mark.parametrize("bits, block, h, scheme", [(8, 32, 128, "rtn-symmetric"), (4, 32, 128, "mse-zeropoint"),
                                                    (4, 64, 96, "mse-asymmetric"), (8, 128, 96, "rtn-symmetric")])
def test_a_tied_table_is_stored_once_and_reads_as_two_copies_do(tmp_path, bits, block, h, scheme):
    """Embedding rows and lm_head logits from the one shared copy equal those of two copies,
    padded last blocks (h=96, block 64/128) and float mins included; the data holds one copy."""
    v = 300
    bq = quantize(RNG.normal(0, 0.05, (v, h)).astype(np.float32), bits, block, scheme)
    ids = np.array([[0, 7, 299, 7, 42]], np.int64)
    x = RNG.normal(0, 1, (1, 3, h)).astype(np.float32)
    (shared_dir := tmp_path / "shared").mkdir()
    (twice_dir := tmp_path / "twice").mkdir()
    one, one_bytes = _table_graph(shared_dir, bq, True, h)
    two, two_bytes = _table_graph(twice_dir, bq, False, h)
    rows, logits = one.run(None, {"ids": ids, "x": x})
    rows2, logits2 = two.run(None, {"ids": ids, "x": x})
    np.testing.assert_array_equal(rows, rows2)
    np.testing.assert_array_equal(logits, logits2)
    np.testing.assert_allclose(rows[0], bq.dequantize()[ids[0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logits[0], x[0] @ bq.dequantize().T, rtol=1e-4, atol=1e-4)
    assert two_bytes - one_bytes >= bq.packed().nbytes


def test_scales_exact_in_half_are_stored_as_half_and_compute_the_same(tmp_path, monkeypatch):
    """GGUF-like blocks (float16 scale and min): stored as float16 behind a Cast, the graph's
    outputs equal the float32-stored graph's exactly."""
    w = quantize(RNG.normal(0, 0.05, (64, 128)).astype(np.float32), 4, 32, "rtn-asymmetric")
    from dataclasses import replace

    w = replace(w, scales=w.scales.astype(np.float16).astype(np.float32), mins=w.mins.astype(np.float16).astype(np.float32))
    ids, x = np.array([[1, 2, 3]], np.int64), RNG.normal(0, 1, (1, 2, 128)).astype(np.float32)
    (half_dir := tmp_path / "half").mkdir()
    half, half_bytes = _table_graph(half_dir, w, True, 128)
    monkeypatch.setattr(quant_nodes, "_exact_in_half", lambda values: False)
    (full_dir := tmp_path / "full").mkdir()
    full, full_bytes = _table_graph(full_dir, w, True, 128)
    for a, b in zip(half.run(None, {"ids": ids, "x": x}), full.run(None, {"ids": ids, "x": x})):
        np.testing.assert_array_equal(a, b)
    assert full_bytes - half_bytes >= w.scales.nbytes  # scales and mins at 2 bytes instead of 4
    types = {t.name: t.data_type for t in onnx.load(str(half_dir / "t.onnx"), load_external_data=False).graph.initializer}
    assert types["table.scales.f16"] == types["table.mins.f16"] == TensorProto.FLOAT16


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny tied Llama (4 layers, hidden 128) exported to fp32."""
    from conftest import make_tiny

    root = tmp_path_factory.mktemp("presets")
    make_tiny(root / "hf", hidden_size=128, intermediate_size=256, num_hidden_layers=4, initializer_range=0.05,
              tie_word_embeddings=True)
    export(root / "hf", root / "fp32")
    return root


def _size(folder) -> int:
    return sum(f.stat().st_size for f in folder.iterdir())


def _tables(folder) -> list[str]:
    """uint8 initializers with the vocabulary's rows: quantized copies of the token table."""
    vocab = json.loads((folder / "edgellama.json").read_text())["vocab_size"]
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [t.name for t in graph.initializer if t.data_type == TensorProto.UINT8 and t.dims and t.dims[0] == vocab]


@pytest.mark.parametrize("route", ["export", "quantize"])
def test_a_tied_model_folder_holds_one_table(tiny, route):
    out = tiny / f"one-table-{route}"
    opt = QuantOptions(bits=4, embeddings="int8", lm_head="int8", calibrate=False, force=True)
    if route == "export":
        export(tiny / "hf", out, ExportOptions(quant=opt, force=True))
    else:
        quantize_folder(tiny / "fp32", out, opt)
    assert len(_tables(out)) == 1
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx"), load_external_data=False).graph.node]
    assert "GatherBlockQuantized" in ops and ops.count("MatMulNBits") == 4 * 4 + 1


def _kl(folder, ref_logits, ids) -> float:
    got = log_softmax(full_logits(Model.load(folder), ids))
    ref = log_softmax(ref_logits)
    return float((np.exp(ref) * (ref - got)).sum(-1).mean())


def test_presets_order_by_size_and_accuracy(tiny):
    """small <= balanced <= accurate in size, and the other way round in KL against float."""
    ids = list(RNG.integers(3, 300, 48))
    ref = full_logits(Model.load(tiny / "fp32"), ids)
    size, kl = {}, {}
    for name in PRESETS:
        out = tiny / f"preset-{name}"
        manifest = quantize_folder(tiny / "fp32", out, QuantOptions.from_preset(name, force=True, calibration_tokens=CALIBRATION))
        assert manifest.quantization["preset"] == name
        size[name], kl[name] = _size(out), _kl(out, ref, ids)
    assert size["small"] < size["balanced"] < size["accurate"], size
    assert kl["small"] >= kl["balanced"] >= kl["accurate"], kl


def test_size_budget_holds_and_a_tighter_one_never_grows_the_folder(tiny):
    sizes = []
    for budget in (1.2, 0.8, 0.62):
        out = tiny / f"budget-{budget}"
        manifest = quantize_folder(tiny / "fp32", out, QuantOptions.from_preset("balanced", size_budget_mb=budget,
                                                                                force=True, calibration_tokens=CALIBRATION))
        assert _size(out) <= budget * 1e6, (budget, _size(out))
        sizes.append((_size(out), len(manifest.quantization["int8_projections"])))
    assert sizes == sorted(sizes, reverse=True), sizes
    assert sizes[0][1] > sizes[-1][1]  # the budget did pick: more projections at 8 bits with more room
    with pytest.raises(BadArgumentError, match="below the smallest folder"):
        quantize_folder(tiny / "fp32", tiny / "too-small", QuantOptions.from_preset("balanced", size_budget_mb=0.05,
                                                                                       calibration_tokens=CALIBRATION))
    assert not (tiny / "too-small").exists()


def test_mixed_choice_spends_bytes_where_the_fit_loses_most(tiny):
    """At the same budget, the projections chosen by measured output error give a lower KL
    than the same number chosen the other way round (the least sensitive first)."""
    from edgellama.quantize import mixed

    ids = list(RNG.integers(3, 300, 48))
    ref = full_logits(Model.load(tiny / "fp32"), ids)
    opt = QuantOptions.from_preset("balanced", mixed_share=0.3, force=True, calibration_tokens=CALIBRATION)
    best = quantize_folder(tiny / "fp32", tiny / "mixed-best", opt)
    original = mixed.choose

    def worst(candidates, fixed, budget, share):
        flipped = [mixed.Candidate(c.key, c.name, c.bytes4, c.bytes8, c.error8, c.error4) for c in candidates]
        picked = original(flipped, fixed, budget, share)
        return picked

    mixed.choose = worst
    try:
        flipped = quantize_folder(tiny / "fp32", tiny / "mixed-worst", opt)
    finally:
        mixed.choose = original
    assert best.quantization["int8_projections"] != flipped.quantization["int8_projections"]
    assert _kl(tiny / "mixed-best", ref, ids) < _kl(tiny / "mixed-worst", ref, ids)


def test_cli_preset_and_explicit_options(tiny):
    runner = CliRunner()
    out = tiny / "cli-small"
    r = runner.invoke(main, ["quantize", str(tiny / "fp32"), str(out), "--preset", "small", "--block-size", "32",
                             "--calibration-tokens", str(CALIBRATION)])
    assert r.exit_code == 0, r.output
    q = json.loads((out / "edgellama.json").read_text())["quantization"]
    assert q["preset"] == "small" and q["block_size"] == 32 and q["lm_head"] == "int4"
    r = runner.invoke(main, ["quantize", str(tiny / "fp32"), str(tiny / "cli-budget"), "--size-budget", "0.01"])
    assert r.exit_code != 0 and "below the smallest folder" in r.output and not (tiny / "cli-budget").exists()
    r = runner.invoke(main, ["quantize", str(tiny / "fp32"), str(tiny / "cli-b8"), "--bits", "8", "--size-budget", "1"])
    assert r.exit_code != 0 and "needs --bits 4" in r.output


def test_a_vocabulary_tables_fit_is_weighed_by_the_lm_heads_inputs(tiny, monkeypatch):
    """The tied table is fitted once, where the embedding Gather reaches it, yet weighted by the
    calibration statistics of the lm_head's input (the final norm's output), not left plain;
    under those statistics its error is lower than the plain fit's."""
    from edgellama.quantize import rewrite

    calls = []
    real = rewrite.quantize

    def spy(w, bits, block, scheme, importance=None):
        calls.append((w, importance))
        return real(w, bits, block, scheme, importance=importance)

    monkeypatch.setattr(rewrite, "quantize", spy)
    vocab = Model.load(tiny / "fp32").vocab_size
    opt = QuantOptions.from_preset("small", force=True, calibration_tokens=CALIBRATION)
    quantize_folder(tiny / "fp32", tiny / "table-calibrated", opt)
    tables = [(w, imp) for w, imp in calls if w.shape[0] == vocab]
    assert len(tables) == 1 and tables[0][1] is not None  # one fit, weighted
    w, imp = tables[0][0], np.asarray(tables[0][1], np.float64)
    assert imp.shape == (128,) and imp.std() > 0.1 * imp.mean()  # real activations' spread, not uniform
    weighted = lambda bq: float(((bq.dequantize() - w) ** 2).sum(0) @ imp)  # noqa: E731
    calibrated = real(w, 4, 32, "mse-zeropoint", importance=imp)
    plain = real(w, 4, 32, "mse-zeropoint")
    assert weighted(calibrated) < weighted(plain)


def test_the_mixed_choice_reuses_its_4_bit_fits_bit_for_bit(tiny, monkeypatch):
    """Quantize fits each projection once: the 4-bit fits the mixed choice measured are the ones
    written, and the folder is byte-identical to fitting them again."""
    from edgellama.quantize import mixed

    from edgellama.quantize import rewrite

    opt = QuantOptions.from_preset("balanced", mixed_share=0.3, force=True, calibration_tokens=CALIBRATION)
    fits = []
    real_fit = rewrite.quantize
    monkeypatch.setattr(rewrite, "quantize", lambda w, bits, *a, **k: fits.append(bits) or real_fit(w, bits, *a, **k))
    quantize_folder(tiny / "fp32", tiny / "reused", opt)
    assert fits.count(4) == 1  # the vocabulary table only: every 4-bit projection came from the measurement
    real = mixed.measure
    monkeypatch.setattr(mixed, "measure", lambda *a, **k: (real(*a, **k)[0], {}))
    quantize_folder(tiny / "fp32", tiny / "refitted", opt)
    for name in ("model.onnx", "model.onnx.data"):
        assert (tiny / "reused" / name).read_bytes() == (tiny / "refitted" / name).read_bytes(), name


def test_a_presets_tables_never_have_fewer_bits_than_asked_for():
    """`quantize --bits 8` under the default preset (int4 tables) writes int8 tables; a table
    given explicitly still wins."""
    opt = QuantOptions.from_preset("balanced", bits=8)
    assert (opt.embeddings, opt.lm_head, opt.block_for(table=True)) == ("int8", "int8", opt.block_size)
    assert QuantOptions.from_preset("balanced", bits=8, lm_head="int4").lm_head == "int4"
    assert QuantOptions.from_preset("balanced").lm_head == "int4"
