"""A plain onnxruntime.InferenceSession loads every exported graph without a warning and
runs it the plain way; num_logits_to_keep [0] returns every position, [K] the last K."""

from __future__ import annotations

import subprocess
import sys

import pytest

from edgellama.buildkit.quant_options import QuantOptions
from edgellama.exporter.export import ExportOptions, export
from edgellama.quantize import quantize_folder

PLAIN_LOAD = """
import sys, numpy as np, onnxruntime as ort
sess = ort.InferenceSession(sys.argv[1] + "/model.onnx")  # default options: warnings shown
feeds = {"input_ids": np.array([[5, 6, 7]], np.int64), "attention_mask": np.ones((1, 3), np.int64),
         "num_logits_to_keep": np.array([int(sys.argv[2])], np.int64)}
for i in sess.get_inputs():
    if i.name.startswith("past_key_values"):
        feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
print(sess.run(["logits"], feeds)[0].shape)
"""


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from conftest import make_tiny

    base = tmp_path_factory.mktemp("hygiene")
    make_tiny(base / "hf")
    export(base / "hf", base / "fp32")
    export(base / "hf", base / "int4", ExportOptions(quant=QuantOptions(bits=4)))
    quantize_folder(base / "fp32", base / "int8", QuantOptions(bits=8, calibrate=False))
    return base


@pytest.mark.parametrize("name", ["fp32", "int4", "int8"])
@pytest.mark.parametrize("keep, positions", [(0, 3), (1, 1)])
def test_plain_session_loads_without_warnings(folders, name, keep, positions):
    out = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(folders / name), str(keep)], capture_output=True,
                         text=True, check=True)
    assert out.stderr == "", out.stderr
    assert out.stdout.strip() == f"(1, {positions}, 320)"
