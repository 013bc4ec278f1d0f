"""CLI surfaces: inspect, --show-probs, stdout carries only the generated text."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

from edgellama.cli import main
from edgellama.exporter.export import export
from edgellama.runtime.model import Model


@pytest.mark.slow
def test_inspect_prints_manifest_and_io(smollm2_onnx):
    r = CliRunner().invoke(main, ["inspect", str(smollm2_onnx)])
    assert r.exit_code == 0, r.output
    assert '"num_layers": 30' in r.output and '"kv_buffer": "shared"' in r.output
    assert re.search(r"past_key_values\.29\.value\s+float\s+\['batch', 3, 'past_seq', 64\]", r.output)
    assert re.search(r"logits\s+float\s+\['batch', 'seq', 49152\]", r.output)


@pytest.mark.slow
def test_show_probs_goes_to_stderr(smollm2_onnx):
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(smollm2_onnx), "--prompt", "The best thing about AI is its ability to",
                             "--max-new-tokens", "3", "--show-probs", "4", "--threads", "2", "--raw"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith("The best thing about AI is its ability to → ")
    shown = re.findall(r'("(?:[^"\\]|\\.)*") (\d+\.\d) %', line)
    assert len(shown) == 4 and shown[0][0] == '" make"'  # quoted: the leading space shows
    probs = [float(p) for _, p in shown]
    assert probs == sorted(probs, reverse=True)
    assert r.stdout.startswith(" make") and "%" not in r.stdout


def test_show_probs_on_a_tiny_model(tiny_factory, tmp_path):
    """The same split without the real model: the distribution on stderr, stdout exactly the text."""
    folder, _ = tiny_factory()
    export(folder, tmp_path / "m")
    prompt = "The quick brown fox"
    r = CliRunner().invoke(main, ["run", str(tmp_path / "m"), "--prompt", prompt, "--max-new-tokens", "3",
                                  "--show-probs", "4", "--raw"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith(f"{prompt} → ")
    probs = [float(p) for p in re.findall(r" (\d+\.\d) %", line)]  # token texts may be any bytes
    assert len(probs) == 4 and probs == sorted(probs, reverse=True)
    assert r.stdout == Model.load(tmp_path / "m").generate_text(prompt, max_new_tokens=3) + "\n"
