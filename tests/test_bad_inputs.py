"""Bad inputs through the CLI: one clear error line, exit code != 0, nothing left behind."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from click.testing import CliRunner

from edgellama.cli import main


def _export(source, out, *extra):
    result = CliRunner().invoke(main, ["export", str(source), str(out), *extra])
    return result


def _assert_clean_failure(result, out, *needles):
    assert result.exit_code != 0
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert "Traceback" not in result.output
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def tiny(tiny_factory):
    folder, _ = tiny_factory()
    return folder


def test_missing_config(tiny, tmp_path):
    (tiny / "config.json").unlink()
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "config.json is missing")


def test_unsupported_architecture(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["architectures"] = ["GPTNeoXForCausalLM"]
    (tiny / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "GPTNeoXForCausalLM", "LlamaForCausalLM", "supported")


def test_truncated_safetensors(tiny, tmp_path):
    path = tiny / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "model.safetensors", "truncated")


def test_missing_tensor(tiny, tmp_path):
    _rewrite_safetensors(tiny / "model.safetensors", drop="model.layers.1.mlp.up_proj.weight")
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "model.layers.1.mlp.up_proj.weight", "missing")


def test_wrong_tensor_shape(tiny, tmp_path):
    cfg = json.loads((tiny / "config.json").read_text())
    cfg["intermediate_size"] = 128  # the checkpoint has 96
    (tiny / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "shape", "expected")


def test_pickle_checkpoint_refused(tiny, tmp_path):
    (tiny / "model.safetensors").unlink()
    (tiny / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    out = tmp_path / "out"
    _assert_clean_failure(_export(tiny, out), out, "pickle", "safetensors")


def test_truncated_gguf(smollm2_gguf, tmp_path):
    bad = tmp_path / "cut.gguf"
    with open(smollm2_gguf, "rb") as src:
        bad.write_bytes(src.read(40_000_000))
    out = tmp_path / "out"
    _assert_clean_failure(_export(bad, out), out, "cut.gguf", "truncated")


def test_gguf_absurd_tensor_count(tmp_path):
    bad = tmp_path / "huge.gguf"
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 1) + b"\0" * 64)
    out = tmp_path / "out"
    _assert_clean_failure(_export(bad, out), out, "huge.gguf", "tensors")


def test_existing_output_refused_without_force(tiny, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = _export(tiny, out)
    assert result.exit_code != 0 and "--force" in result.output
    assert (out / "keep.txt").read_text() == "mine"
    assert _export(tiny, out, "--force").exit_code == 0
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()


def test_interrupted_export_leaves_nothing(tiny, tmp_path, monkeypatch):
    from edgellama.exporter import graph

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(graph, "swiglu", boom)
    out = tmp_path / "out"
    result = _export(tiny, out)
    assert result.exit_code == 130
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def _rewrite_safetensors(path, drop: str) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    del tensors[drop]
    save_file(tensors, str(path), metadata={"format": "pt"})


def test_run_errors_are_one_line(smollm2_onnx, tmp_path):
    runner = CliRunner()
    bad_top_p = runner.invoke(main, ["run", str(smollm2_onnx), "--prompt", "hi", "--top-p", "0"])
    assert bad_top_p.exit_code != 0 and "top_p" in bad_top_p.output and "Traceback" not in bad_top_p.output
    empty = runner.invoke(main, ["run", str(smollm2_onnx), "--prompt", ""])
    assert empty.exit_code != 0 and "empty" in empty.output
    not_a_model = runner.invoke(main, ["run", str(tmp_path), "--prompt", "hi"])
    assert not_a_model.exit_code != 0 and "edgellama.json" in not_a_model.output
    copy = tmp_path / "copy"
    shutil.copytree(smollm2_onnx, copy)
    long_prompt = "word " * 9000
    overflow = runner.invoke(main, ["run", str(copy), "--prompt", long_prompt])
    assert overflow.exit_code != 0 and "context" in overflow.output
