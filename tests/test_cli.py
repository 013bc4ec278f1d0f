"""CLI surfaces: inspect, --show-probs, stdout carries only the generated text."""

from __future__ import annotations

import re

from click.testing import CliRunner

from edgellama.cli import main


def test_inspect_prints_manifest_and_io(smollm2_onnx):
    r = CliRunner().invoke(main, ["inspect", str(smollm2_onnx)])
    assert r.exit_code == 0, r.output
    assert '"num_layers": 30' in r.output and '"kv_buffer": "shared"' in r.output
    assert re.search(r"past_key_values\.29\.value\s+float\s+\['batch', 3, 'past_seq', 64\]", r.output)
    assert re.search(r"logits\s+float\s+\['batch', 'seq', 49152\]", r.output)


def test_show_probs_goes_to_stderr(smollm2_onnx):
    runner = CliRunner()
    r = runner.invoke(main, ["run", str(smollm2_onnx), "--prompt", "The best thing about AI is its ability to",
                             "--max-new-tokens", "3", "--show-probs", "4", "--threads", "2"])
    assert r.exit_code == 0, r.output
    line = r.stderr.strip().splitlines()[0]
    assert line.startswith("The best thing about AI is its ability to → ")
    shown = re.findall(r"(\S+) (\d+\.\d) %", line)
    assert len(shown) == 4 and shown[0][0] == "make"
    probs = [float(p) for _, p in shown]
    assert probs == sorted(probs, reverse=True)
    assert r.stdout.startswith(" make") and "%" not in r.stdout
