"""Progress: the (done, total, what) callbacks of export / quantize / eval / compile, the
command line's display of them (edgellama.progress), and the quantize summary's error figure."""

from __future__ import annotations

import io
import json
import re
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from click.testing import CliRunner

from edgellama.buildkit.quant_options import QuantOptions
from edgellama.exporter.export import ExportOptions, export
from edgellama.progress import TaskProgress, format_seconds, split_what, task_progress
from edgellama.quantize.rewrite import quantize_folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random Llama exported to fp32 (its weights are not on any quantization grid)."""
    from conftest import tiny_float_folder

    return tiny_float_folder(tmp_path_factory, "tiny-progress")


class Recorder:
    """Wraps a callback: records every call and checks 0 <= done <= total as they come."""

    def __init__(self, inner=lambda done, total, what: None):
        self.calls: list[tuple[int, int, str]] = []
        self.inner = inner

    def __call__(self, done, total, what):
        assert isinstance(done, int) and isinstance(total, int) and isinstance(what, str), (done, total, what)
        assert 0 <= done <= total, (done, total, what)
        self.calls.append((done, total, what))
        self.inner(done, total, what)

    def phases(self) -> list[str]:
        """The phases in the order they began; a phase that came back would appear twice."""
        out: list[str] = []
        for _, _, what in self.calls:
            if not out or out[-1] != what:
                out.append(what)
        return out

    def check_each_phase_completes(self) -> None:
        """Within a phase, done never goes back and the total never changes; each ends at its total."""
        for what in self.phases():
            seen = [(d, t) for d, t, w in self.calls if w == what]
            assert len({t for _, t in seen}) == 1, (what, seen)
            assert [d for d, _ in seen] == sorted(d for d, _ in seen), (what, seen)
            assert seen[-1][0] == seen[-1][1], (what, seen)


def _calibration_windows(folder) -> int:
    """How many windows the default calibration makes of the shipped text for this model."""
    from tokenizers import Tokenizer

    from edgellama.quantize.calibrate import DEFAULT_TOKENS, WINDOW, default_text
    from edgellama.runtime.contract import Manifest

    ids = Tokenizer.from_file(str(folder / "tokenizer.json")).encode(default_text(), add_special_tokens=False).ids
    ids = ids[:DEFAULT_TOKENS]
    return len(range(0, len(ids) - 1, min(WINDOW, Manifest.load(folder).context_length)))


# ---- the library's callbacks ----------------------------------------------------------------

def test_quantize_summary_line_has_the_true_totals(tiny, tmp_path):
    out = io.StringIO()
    with task_progress("quantizing", mode="summary", file=out) as progress:
        recorder = Recorder(progress)
        manifest = quantize_folder(tiny / "fp32", tmp_path / "q4", QuantOptions(), recorder)
    assert recorder.phases() == ["calibrate:windows", "fit:tensors", "write"]
    recorder.check_each_phase_completes()
    windows, tensors = _calibration_windows(tiny / "fp32"), manifest.quantization["quantized_weights"]
    assert tensors == 2 * 4 + 2  # per layer: qkv, o, gate_up, down; the embedding table; the lm_head
    line = out.getvalue()
    assert re.fullmatch(rf"quantizing: calibrate {windows}/{windows} windows, fit {tensors}/{tensors} tensors, "
                        r"write 3/3 — \d+\.\d s\n", line), line


def test_uncalibrated_quantize_has_no_calibration_phase(tiny, tmp_path):
    recorder = Recorder()
    manifest = quantize_folder(tiny / "fp32", tmp_path / "q8", QuantOptions(bits=8, calibrate=False), recorder)
    assert recorder.phases() == ["fit:tensors", "write"]
    recorder.check_each_phase_completes()
    assert recorder.calls[0] == (0, manifest.quantization["quantized_weights"], "fit:tensors")


def test_export_eval_and_compile_phases(tiny, tmp_path):
    from edgellama.deploy.compile import CompileOptions, compile_folder
    from edgellama.runtime.model import Model
    from edgellama.tools.evaluate import evaluate

    recorder = Recorder()
    export(tiny / "hf", tmp_path / "e", ExportOptions(), recorder)
    assert recorder.phases() == ["build:layers", "write"]
    recorder.check_each_phase_completes()
    assert recorder.calls[0] == (0, 2, "build:layers")

    recorder = Recorder()
    result = evaluate(Model.load(tiny / "fp32", threads=1), "The quick brown fox jumps over the lazy dog. " * 8,
                      window=16, progress=recorder)
    assert recorder.phases() == ["score:windows"] and result.tokens > 16
    recorder.check_each_phase_completes()

    recorder = Recorder()
    compile_folder(tiny / "fp32", tmp_path / "ort", CompileOptions(format="ort", prepack=False), recorder)
    assert recorder.phases() == ["optimize", "operators:files"]
    recorder.check_each_phase_completes()
    assert recorder.calls[-1] == (2, 2, "operators:files")


# ---- the display ----------------------------------------------------------------------------

def _feed(progress) -> None:
    for i in range(4):
        progress(i, 3, "calibrate:windows")
    for i in range(11):
        progress(i, 10, "fit:tensors")
    progress(0, 1, "write")
    progress(1, 1, "write")


def test_summary_mode_prints_one_line_and_nothing_on_an_error():
    out = io.StringIO()
    with task_progress("quantizing", mode="summary", file=out) as progress:
        _feed(progress)
        assert out.getvalue() == ""  # nothing while it runs
    assert re.fullmatch(r"quantizing: calibrate 3/3 windows, fit 10/10 tensors, write 1/1 — \d+\.\d s\n",
                        out.getvalue()), out.getvalue()

    out = io.StringIO()
    with pytest.raises(RuntimeError):
        with task_progress("quantizing", mode="summary", file=out) as progress:
            progress(1, 3, "calibrate:windows")
            raise RuntimeError("boom")
    assert out.getvalue() == ""


def test_forced_terminal_mode_renders_bars(tiny, tmp_path):
    out = io.StringIO()
    with task_progress("quantizing", mode="bars", file=out) as progress:
        _feed(progress)
    text = out.getvalue()
    assert "quantizing: calibrate" in text and "quantizing: fit" in text and "quantizing: write" in text
    assert "\r" in text and "tensors/s" in text and "0/10" in text  # tqdm's bar: n/total, rate
    last = text.rsplit("\r", 1)[-1]  # the bars are cleared; the finished line stays
    assert re.fullmatch(r"quantizing: calibrate 3/3 windows, fit 10/10 tensors, write 1/1 — \d+\.\d s\n", last), text

    out = io.StringIO()  # a real quantization through the bars
    with task_progress("quantizing", mode="bars", file=out) as progress:
        quantize_folder(tiny / "fp32", tmp_path / "q", QuantOptions(calibrate=False), progress)
    assert out.getvalue().rsplit("\r", 1)[-1].startswith("quantizing: fit 10/10 tensors, write 3/3 — ")

    out = io.StringIO()  # an error: bars cleared, no finished line
    with pytest.raises(KeyboardInterrupt):
        with task_progress("quantizing", mode="bars", file=out) as progress:
            progress(1, 3, "calibrate:windows")
            raise KeyboardInterrupt
    assert "quantizing: calibrate" in out.getvalue() and out.getvalue().rsplit("\r", 1)[-1] == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_mode_follows_the_terminal_unless_forced(monkeypatch):
    monkeypatch.delenv("EDGELLAMA_PROGRESS", raising=False)
    assert TaskProgress("x", file=_Terminal()).mode == "bars"
    assert TaskProgress("x", file=io.StringIO()).mode == "summary"
    monkeypatch.setenv("EDGELLAMA_PROGRESS", "bars")
    assert TaskProgress("x", file=io.StringIO()).mode == "bars"
    monkeypatch.setenv("EDGELLAMA_PROGRESS", "summary")
    assert TaskProgress("x", file=_Terminal()).mode == "summary"
    assert TaskProgress("x", mode="bars", file=io.StringIO()).mode == "bars"  # the argument wins
    monkeypatch.setenv("EDGELLAMA_PROGRESS", "off")
    out = io.StringIO()
    with task_progress("x", file=out) as progress:
        progress(1, 1, "write")
    assert out.getvalue() == ""
    with pytest.raises(ValueError):
        TaskProgress("x", mode="fancy")


def test_helpers():
    assert split_what("fit:tensors") == ("fit", "tensors") and split_what("write") == ("write", None)
    assert format_seconds(41.24) == "41.2 s" and format_seconds(185) == "3 min 05 s"
    assert format_seconds(3725) == "1 h 02 min"
    out = io.StringIO()
    with task_progress("compiling", mode="summary", file=out):
        pass
    assert out.getvalue() == ""  # nothing reported, nothing done: no line


def test_the_runtime_never_imports_tqdm(tiny):
    """What ships inside apps (edgellama.runtime) loads and generates without tqdm or this module;
    importing edgellama.progress does not load tqdm either (bars import it when drawn)."""
    script = textwrap.dedent(f"""
        import sys
        import edgellama.runtime.model as m
        model = m.Model.load({str(tiny / "fp32")!r}, threads=1)
        text = model.generate_text("The quick brown fox", max_new_tokens=4)
        bad = sorted(n for n in sys.modules if n.split(".")[0] == "tqdm" or n == "edgellama.progress")
        assert not bad, bad
        import edgellama.progress
        assert "tqdm" not in sys.modules
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


# ---- the quantize summary's error figure ------------------------------------------------------

def _error_shown(output: str) -> str:
    m = re.search(r"mean relative (?:weight )?error (\S+?)\)?$", output, re.M)
    assert m, output
    return m.group(1)


def _on_the_grid(src, dst, options: QuantOptions) -> None:
    """Copy the float folder `src` to `dst` with every weight quantize will touch snapped to
    4-bit blocks of 32 with a float minimum: a float export of a GGUF Q4_1 file."""
    import onnx

    from edgellama.buildkit.schemes import quantize
    from edgellama.quantize.rewrite import InitializerReader, _targets
    from edgellama.runtime.contract import Manifest

    shutil.copytree(src, dst)
    model = onnx.load(str(dst / "model.onnx"), load_external_data=False)
    reader = InitializerReader(dst, model.graph)
    seen = set()
    for target in _targets(model.graph, reader, options, Manifest.load(dst).vocab_size):
        if target is None or target.weight in seen:
            continue
        seen.add(target.weight)
        stored = reader.array(target.weight)
        assert isinstance(stored, np.memmap)
        w = np.asarray(stored, np.float32)
        w_nk = w.T if target.layout == "kn" else w
        snapped = quantize(w_nk, 4, 32, "rtn-asymmetric").with_half_scales().dequantize()  # GGUF: float16 scale, min
        writable = np.memmap(stored.filename, dtype=stored.dtype, mode="r+", offset=stored.offset, shape=stored.shape)
        writable[...] = snapped.T if target.layout == "kn" else snapped
        writable.flush()
        del writable


def test_quantize_reports_a_nonzero_error(tiny, tmp_path):
    """The summary printed `mean relative error 0.0000`: the figure is the mean over the
    quantized weights of ||W - deq(Q(W))|| / ||W||, and for a float export of a GGUF Q4_1
    file (SmolLM2) the weights already lie on the int4 grid, so it is ~4e-8 (1e-5 with
    calibration), which four decimals round to zero. It is shown to 3 significant figures."""
    runner = CliRunner()
    r = runner.invoke(main_cli(), ["quantize", str(tiny / "fp32"), str(tmp_path / "random"), "--no-calibration"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "random" / "edgellama.json").read_text())["quantization"]["mean_relative_error"]
    shown = _error_shown(r.output)
    assert 0.01 < recorded < 0.2 and float(shown) == pytest.approx(recorded, rel=5e-3), (shown, recorded)

    # int4 mse-asymmetric, block 32, int8 tables, as asked for below: the projections come back
    # exactly, the 8-bit table off the 4-bit grid by its float16 scales' rounding (~1e-4)
    options = QuantOptions(calibrate=False)
    _on_the_grid(tiny / "fp32", tmp_path / "grid", options)
    r = runner.invoke(main_cli(), ["quantize", str(tmp_path / "grid"), str(tmp_path / "q"), "--no-calibration",
                                   "--method", "mse", "--block-size", "32", "--embeddings", "int8",
                                   "--lm-head", "int8"])
    assert r.exit_code == 0, r.output
    recorded = json.loads((tmp_path / "q" / "edgellama.json").read_text())["quantization"]["mean_relative_error"]
    shown = _error_shown(r.output)
    assert 0 < recorded < 4e-4 and f"{recorded:.3f}" == "0.000", recorded
    assert float(shown) > 0 and float(shown) == pytest.approx(recorded, rel=5e-3), (shown, recorded)


def main_cli():
    from edgellama.cli import main

    return main
