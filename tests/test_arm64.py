"""`edgellama compile --target arm64` on x86: the folder records its target, names the
default zero point of every 4-bit MatMulNBits (so ARM's int8 path quantizes activations per
block; see deploy/compile.py), holds nothing tied to this CPU, and still runs here with its
source's greedy tokens. The ARM side is proved under emulation by scripts/arm64_check.sh."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from conftest import PROMPT_IDS, make_tiny
from edgellama.buildkit.quant_options import QuantOptions
from edgellama.cli import main
from edgellama.deploy.compile import CompileOptions, compile_folder
from edgellama.exporter.export import ExportOptions, export
from edgellama.quantize.rewrite import quantize_folder
from edgellama.runtime import artifact
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model
from edgellama.tools.evaluate import full_logits

TINY_PROMPT = [5, 17, 42, 99, 7, 250, 31]


def greedy(folder: Path, prompt, n: int = 12) -> list[int]:
    model = Model.load(folder, threads=2)
    return [s.token_id for s in model.generate(prompt, max_new_tokens=n, ignore_eos=True)]


def nbits_nodes(folder: Path) -> list[onnx.NodeProto]:
    graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
    return [n for n in graph.node if n.op_type == "MatMulNBits"]


def zero_points(node: onnx.NodeProto) -> str:
    return node.input[3] if len(node.input) > 3 else ""


def bits(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "bits")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """fp32 and int4 folders (float-min blocks: MatMulNBits without zero points, what KleidiAI takes)."""
    root = tmp_path_factory.mktemp("arm64")
    make_tiny(root / "hf")
    export(root / "hf", root / "fp32")
    quantize_folder(root / "fp32", root / "int4", QuantOptions(bits=4, calibrate=False))
    return root


def test_int4_folder_for_arm64_records_target_and_runs_here(tiny, tmp_path):
    out = tmp_path / "int4-arm64"
    result = CliRunner().invoke(main, ["compile", str(tiny / "int4"), str(out), "--target", "arm64"])
    assert result.exit_code == 0, result.output
    rec = Manifest.load(out).compiled
    four = [n for n in nbits_nodes(tiny / "int4") if bits(n) == 4]
    assert four and not any(zero_points(n) for n in four)
    assert rec["target"] == "arm64" and rec["level"] == "extended" and not rec["prepacked"]
    assert "cpu" not in rec  # nothing tied to the compiling CPU
    assert rec["rewrites"]["matmulnbits_explicit_zero_points"] == len(four)
    assert all(zero_points(n) for n in nbits_nodes(out) if bits(n) == 4)
    # The default zero point named explicitly: the same weights, so the same tokens on x86.
    assert greedy(out, TINY_PROMPT) == greedy(tiny / "int4", TINY_PROMPT)


@pytest.mark.parametrize("fmt", ["onnx", "ort"])
def test_float_folder_for_arm64_keeps_its_tokens(tiny, tmp_path, fmt):
    out = tmp_path / f"fp32-arm64-{fmt}"
    manifest = compile_folder(tiny / "fp32", out, CompileOptions(target="arm64", format=fmt))
    assert manifest.compiled["rewrites"] == {"matmulnbits": 0, "matmulnbits_explicit_zero_points": 0}
    assert not manifest.compiled["prepacked"]
    assert greedy(out, TINY_PROMPT) == greedy(tiny / "fp32", TINY_PROMPT)


def accuracy_levels(folder: Path) -> set[int]:
    return {next(a.i for a in n.attribute if a.name == "accuracy_level") for n in nbits_nodes(folder)}


def test_accuracy_level_rewrite_for_arm64_float_compute(tiny, tmp_path):
    """--accuracy-level 1: every MatMulNBits computes in float, so KleidiAI (level 4 only) is
    not in play and no zero points are added; the manifest records the level."""
    out = tmp_path / "int4-arm64-float"
    result = CliRunner().invoke(main, ["compile", str(tiny / "int4"), str(out), "--target", "arm64",
                                       "--accuracy-level", "1"])
    assert result.exit_code == 0, result.output
    assert "accuracy level 1" in result.stderr
    assert accuracy_levels(tiny / "int4") == {4} and accuracy_levels(out) == {1}
    assert not any(zero_points(n) for n in nbits_nodes(out))
    rec = Manifest.load(out).compiled
    assert rec["rewrites"] == {"matmulnbits": len(nbits_nodes(out)), "matmulnbits_explicit_zero_points": 0,
                               "matmulnbits_accuracy_level": 1}
    src, new = (full_logits(Model.load(f, threads=2), TINY_PROMPT) for f in (tiny / "int4", out))
    assert src.shape == new.shape and not np.array_equal(src, new)  # other kernels ran
    # The same weights: int8 activations move this random tiny model's logits by ~8 % of their
    # range (the real model's float-compute check is the slow test below).
    assert np.abs(src - new).max() < 0.2 * np.abs(src).max()


def test_accuracy_level_rewrite_on_cpu_target(tiny, tmp_path):
    manifest = compile_folder(tiny / "int4", tmp_path / "l4", CompileOptions(accuracy_level=0, prepack=False))
    assert accuracy_levels(tmp_path / "l4") == {0}
    assert manifest.compiled["rewrites"] == {"matmulnbits": len(nbits_nodes(tiny / "int4")),
                                             "matmulnbits_accuracy_level": 0}
    with pytest.raises(BadArgumentError, match="--accuracy-level 3"):
        CompileOptions(accuracy_level=3)


@pytest.mark.parametrize("args, says", [(["--level", "all"], "--level all"),
                                        (["--prepack"], "--prepack")])
def test_arm64_refuses_what_ties_the_folder_to_this_cpu(tiny, tmp_path, args, says):
    result = CliRunner().invoke(main, ["compile", str(tiny / "int4"), str(tmp_path / "out"),
                                       "--target", "arm64", *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0]
    assert not (tmp_path / "out").exists()


def test_arm64_folder_loads_with_the_cpu_provider_only(tiny, tmp_path):
    out = tmp_path / "arm64"
    manifest = compile_folder(tiny / "int4", out, CompileOptions(target="arm64"))
    plan = artifact.load_plan(out, manifest, "cpu")
    assert plan.optimize is False and plan.graph == out / "model.onnx"
    with pytest.raises(BadArgumentError, match="--provider cpu"):
        artifact.load_plan(out, manifest, "cuda")


@pytest.mark.slow
def test_smollm2_int4_for_arm64_gives_its_source_text_on_x86(smollm2_gguf, tmp_path):
    export(smollm2_gguf, tmp_path / "int4", ExportOptions(quant=QuantOptions(bits=4)))
    compile_folder(tmp_path / "int4", tmp_path / "int4-arm64", CompileOptions(target="arm64"))
    rec = json.loads((tmp_path / "int4-arm64" / "edgellama.json").read_text())["compiled"]
    assert rec["rewrites"]["matmulnbits_explicit_zero_points"] > 0
    assert greedy(tmp_path / "int4-arm64", PROMPT_IDS, 16) == greedy(tmp_path / "int4", PROMPT_IDS, 16)


@pytest.mark.slow
def test_smollm2_int4_float_compute_gives_the_float_text(smollm2_gguf, smollm2_onnx, tmp_path):
    """The exact Q4_1 import holds the GGUF's weights; computed in float (--accuracy-level 1) it
    gives the fp32 export's logits up to summation order, where int8 activations tip near-ties
    (the seed prompt's top two fp32 logits differ by 0.03)."""
    export(smollm2_gguf, tmp_path / "int4", ExportOptions(quant=QuantOptions(bits=4)))
    compile_folder(tmp_path / "int4", tmp_path / "float", CompileOptions(target="arm64", accuracy_level=1))
    fp32, int8_acts, float_acts = (full_logits(Model.load(f, threads=2), PROMPT_IDS)
                                   for f in (smollm2_onnx, tmp_path / "int4", tmp_path / "float"))
    assert np.abs(float_acts - fp32).max() < 2e-3 < np.abs(int8_acts - fp32).max()
    assert greedy(tmp_path / "float", PROMPT_IDS, 8) == greedy(smollm2_onnx, PROMPT_IDS, 8)
