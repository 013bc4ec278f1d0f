"""Quantize and eval that scale (issue 18, item 4): streaming quantize's memory, and the
shortcuts taken for it giving the same numbers, bit for bit, as the plain computations."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc

import numpy as np
import pytest

from conftest import make_tiny
from edgellama.buildkit import schemes
from edgellama.buildkit.quant_options import QuantOptions


@pytest.fixture(scope="module")
def deep_float(module_tmp):
    """A float model of many layers whose largest tensor (the 8192 x 256 table, 8 MiB) is a
    small share of the whole (~80 MiB): holding it whole would not stay in the bound the
    streaming test sets."""
    from edgellama.exporter.export import export

    root = module_tmp
    make_tiny(root / "hf", hidden_size=256, intermediate_size=768, num_hidden_layers=24, vocab_size=8192,
              num_attention_heads=4, num_key_value_heads=2, initializer_range=0.05)
    export(root / "hf", root / "fp32")
    return root


_CHILD = r"""
import json, sys
from pathlib import Path

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024

from edgellama.buildkit.quant_options import QuantOptions
from edgellama.quantize.rewrite import quantize_folder
import onnxruntime, onnx, tokenizers  # everything quantize imports, before the baseline
import edgellama.quantize.calibrate, edgellama.quantize.gptq
before = hwm()
quantize_folder(Path(sys.argv[1]), Path(sys.argv[2]), QuantOptions(**json.loads(sys.argv[3])))
print(json.dumps({"before": before, "after": hwm()}))
"""


def _peak(src, out, **options) -> dict:
    """Peak RSS (VmHWM) of a child process quantizing src: before quantizing, and after."""
    done = subprocess.run([sys.executable, "-c", _CHILD, str(src), str(out), json.dumps(options)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _largest_tensor_bytes(folder) -> int:
    import onnx

    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return max(int(np.prod(t.dims)) * 4 for t in graph.initializer)


def _float_bytes(folder) -> int:
    return (folder / "model.onnx.data").stat().st_size


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_streaming_quantize_peak_rss_stays_within_a_multiple_of_the_largest_tensor(deep_float, tmp_path):
    """Weights are read (memory-mapped), fitted and written one at a time: what quantizing
    adds to the process's peak is a few copies of the largest tensor (its float pages, the
    fit's codes, the error measured on it) and an allowance (the fit threads' heaps, and
    what the graph writer keeps per weight: ~0.26 MB each here, 25 MB over the 98 weights,
    measured the same before streaming), not the model. Measured: +63 MB for an 8 MB
    largest tensor in a 90 MB model."""
    src = deep_float / "fp32"
    largest, whole = _largest_tensor_bytes(src), _float_bytes(src)
    bound = 4 * largest + 40 * 2**20
    assert whole > 1.2 * bound  # else the bound would not tell streaming from holding it all
    got = _peak(src, tmp_path / "q", method="mse", calibrate=False, force=True)
    added = got["after"] - got["before"]
    assert added <= bound, (added / 2**20, largest / 2**20, whole / 2**20)


@pytest.mark.slow  # ~12 s: calibration runs the float graph
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_calibrated_quantize_holds_the_float_model_once(deep_float, tmp_path):
    """Calibration runs the float graph, so its weights are resident once (prepacked by
    onnxruntime); one window's activations and the diagonal statistics come on top, never
    the statistics' full matrices nor every window's activations."""
    src = deep_float / "fp32"
    got = _peak(src, tmp_path / "q", method="mse", force=True)
    added = got["after"] - got["before"]
    assert added <= 1.5 * _float_bytes(src) + 48 * 2**20, (added / 2**20, _float_bytes(src) / 2**20)


@pytest.mark.parametrize("fit,bits,weighted", [
    (schemes.mse_float_min, 4, True), (schemes.mse_zero_point, 4, True), (schemes.mse_float_min, 8, False),
    (schemes.rtn_symmetric, 4, False), (schemes.rtn_float_min, 8, False)])
def test_fitting_in_slices_of_rows_is_exact(fit, bits, weighted, monkeypatch):
    """Each block of each row is fitted on its own, so slices (and threads) change nothing."""
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((301, 200)) * rng.uniform(0.01, 0.2, (301, 1))).astype(np.float32)  # 200: a padded block
    args = (rng.uniform(0.1, 4.0, 200),) if weighted else ()
    monkeypatch.setattr(schemes, "_SLICE", 1 << 30)
    whole = fit(w, bits, 64, *args)
    monkeypatch.setattr(schemes, "_SLICE", 7 * 200)  # 7 rows a slice: 43 slices, the last one short
    sliced = fit(w, bits, 64, *args)
    for attr in ("q", "scales", "mins", "zeros"):
        a, b = getattr(whole, attr), getattr(sliced, attr)
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b)), attr
    assert whole.bits == sliced.bits and whole.block == sliced.block and whole.cols == sliced.cols


def test_fit_memory_is_a_fraction_of_the_weight():
    """A large weight's least-squares search keeps a few slices' temporaries, not a dozen
    copies of the weight: numpy's allocations stay under the weight's own size."""
    w = np.random.default_rng(2).standard_normal((4096, 512)).astype(np.float32) * 0.05
    tracemalloc.start()
    try:
        bq = schemes.quantize(w, 4, 32, "mse-asymmetric", importance=np.linspace(0.5, 2.0, 512))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    out = bq.q.nbytes + bq.scales.nbytes + bq.mins.nbytes
    assert out < w.nbytes / 2 and peak <= w.nbytes, (peak / 2**20, w.nbytes / 2**20)  # whole at once: ~10x


def test_gram_diagonal_matches_the_full_product():
    from edgellama.quantize.calibrate import _gram_diagonal

    rng = np.random.default_rng(3)
    for k in (64, 200, 576, 1536):
        x = (rng.standard_normal((512, k)) * rng.uniform(0.1, 3.0, k)).astype(np.float32)
        assert np.array_equal(_gram_diagonal(x), np.diag(x.T @ x))


def test_diagonal_statistics_are_those_of_the_full_matrix(deep_float):
    import onnx

    from edgellama.quantize.calibrate import collect_hessians
    from edgellama.quantize.rewrite import InitializerReader, _projection, _targets
    from edgellama.runtime.contract import Manifest

    src = deep_float / "fp32"
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    targets = _targets(model.graph, InitializerReader(src, model.graph), QuantOptions(), Manifest.load(src).vocab_size)
    inputs = {n.input[0] for n, t in zip(model.graph.node, targets) if _projection(t)}
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x * 2\n" * 20
    full, n = collect_hessians(src, model, inputs, text, 256, threads=1)
    diag, m = collect_hessians(src, model, inputs, text, 256, threads=1, diagonal=True)
    assert n == m and set(full) == set(diag) == inputs
    for name in inputs:
        assert full[name].shape == (len(diag[name]),) * 2
        assert np.array_equal(np.diag(full[name]), diag[name]), name


def test_eval_in_turn_gives_the_same_numbers(deep_float, tmp_path):
    """A reference given as a loader is scored after the model is freed; nothing changes."""
    from edgellama.quantize.rewrite import quantize_folder
    from edgellama.runtime.model import Model
    from edgellama.tools.evaluate import evaluate

    quantize_folder(deep_float / "fp32", tmp_path / "q8", QuantOptions(bits=8, method="rtn", calibrate=False))
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x * 2\n" * 12
    both = evaluate(Model.load(tmp_path / "q8", threads=1), text, window=32, stride=24,
                    reference=Model.load(deep_float / "fp32", threads=1))
    in_turn = evaluate(lambda: Model.load(tmp_path / "q8", threads=1), text, window=32, stride=24,
                       reference=lambda: Model.load(deep_float / "fp32", threads=1))
    assert in_turn == both and both.kl is not None and both.kl > 0
    alone = evaluate(lambda: Model.load(tmp_path / "q8", threads=1), text, window=32, stride=24)
    assert alone.perplexity == both.perplexity and alone.tokens == both.tokens


def test_low_memory_sessions_score_the_same(deep_float, tmp_path):
    """Model.load(low_memory=True), what eval uses: no arena, and a float graph reads its weights
    unpacked (a quantized one still prepacks); the scores match the ordinary sessions'."""
    from edgellama.quantize.rewrite import quantize_folder
    from edgellama.runtime.model import Model
    from edgellama.tools.evaluate import evaluate

    quantize_folder(deep_float / "fp32", tmp_path / "q4", QuantOptions(bits=4, method="rtn", calibrate=False))
    text = "The quick brown fox jumps over the lazy dog. def f(x): return x * 2\n" * 12
    plain = evaluate(Model.load(tmp_path / "q4", threads=1), text, window=32,
                     reference=Model.load(deep_float / "fp32", threads=1))
    lean_fp32 = Model.load(deep_float / "fp32", threads=1, low_memory=True)
    lean_q4 = Model.load(tmp_path / "q4", threads=1, low_memory=True)
    entry = "session.disable_prepacking"
    assert lean_fp32.session.get_session_options().get_session_config_entry(entry) == "1"
    assert not lean_fp32.session.get_session_options().enable_cpu_mem_arena
    with pytest.raises(Exception):  # never set: MatMulNBits needs its packed weights
        lean_q4.session.get_session_options().get_session_config_entry(entry)
    lean = evaluate(lean_q4, text, window=32, reference=lean_fp32)
    assert lean.perplexity == pytest.approx(plain.perplexity, rel=1e-5) and lean.kl == pytest.approx(plain.kl, rel=1e-3)


def test_fit_error_of_a_large_table_is_measured_a_slice_at_a_time():
    """The relative error of a weight's fit holds a few slices' temporaries, not dequantized
    float64 copies of the whole weight (Gemma 3's 262k x 640 table: quantize peaked at 4.0 GiB
    that way); and it is the plain computation's figure."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((16384, 512)).astype(np.float32)  # 32 MiB
    for scheme in ("mse-zeropoint", "rtn-asymmetric", "rtn-symmetric"):
        bq = schemes.quantize(w, 4, 64, scheme)
        plain = np.linalg.norm(bq.dequantize() - w.astype(np.float64)) / np.linalg.norm(w.astype(np.float64))
        tracemalloc.start()
        try:
            error = bq.error(w)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert error == pytest.approx(plain, rel=1e-9)
        assert peak < 0.25 * w.nbytes, f"{scheme}: {peak / 2**20:.1f} MiB for a {w.nbytes / 2**20:.0f} MiB weight"


def test_fits_run_on_the_shared_daemon_workers():
    """Large weights are fitted a slice at a time on runtime.workers' daemon threads (tests/
    test_workers.py: why not concurrent.futures), bit for bit as on one thread."""
    w = np.random.default_rng(3).standard_normal((1024, 512)).astype(np.float32)
    pooled = schemes.rtn_symmetric(w, 4, 32)
    single = schemes.rtn_symmetric.__wrapped__(w, 4, 32)
    assert np.array_equal(pooled.q, single.q) and np.array_equal(pooled.scales, single.scales)
    if schemes._workers() > 1:
        fit_threads = [t for t in threading.enumerate() if t.name.startswith("edgellama-fit-")]
        assert fit_threads and all(t.daemon for t in fit_threads)
