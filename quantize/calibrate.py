"""Input statistics for GPTQ: H = sum over calibration tokens of x x^T, for the input x of
every weight that will be quantized, from one run of the float graph over a text.

The graph is re-saved (in a temporary folder, its weights linked, never copied) with
those inputs as extra outputs, and run window by window with an empty KV cache.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from edgellama.runtime import contract as io
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.session import GraphIO, make_session

WINDOW = 512
DEFAULT_TOKENS = 4096


def default_text() -> str:
    """The calibration text shipped with edgellama: English technical prose and Python code
    (docstrings and sources of the Python standard library, PSF licence), about 4,300
    SmolLM2 tokens. It shares nothing with the evaluation text (GPL-3)."""
    return resources.files("edgellama.quantize").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def collect_hessians(folder: Path, model: onnx.ModelProto, inputs: set[str], text: str | None,
                     max_tokens: int = DEFAULT_TOKENS, threads: int | None = None,
                     progress: Callable[[int, int, str], None] = lambda done, total, what: None
                     ) -> tuple[dict[str, np.ndarray], int]:
    """{tensor name: (K, K) float64 sum of x x^T}, and the number of tokens seen."""
    from tokenizers import Tokenizer

    folder = Path(folder)
    manifest = Manifest.load(folder)
    if not (folder / io.TOKENIZER_NAME).is_file():
        raise BadArgumentError(f"{folder}: calibration needs the model's tokenizer.json; add it, or quantize "
                               "with --no-calibration")
    tokenizer = Tokenizer.from_file(str(folder / io.TOKENIZER_NAME))
    ids = tokenizer.encode(default_text() if text is None else text, add_special_tokens=False).ids[:max_tokens]
    if len(ids) < 2:
        raise BadArgumentError("the calibration text is empty; give a text file with some sentences in it")
    window = min(WINDOW, manifest.context_length)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # the caller's graph stays untouched
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[manifest.kv_numpy_dtype]
    names = sorted(inputs)
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, elem, None))
    starts = list(range(0, len(ids) - 1, window))
    progress(0, len(starts), "calibrate:windows")  # before the session: creating it takes a while
    session = make_session(probe.SerializeToString(), "cpu", threads, external_data_folder=folder)
    gio = GraphIO.from_session(session, str(folder), manifest.num_kv_heads, manifest.head_dim)
    hessians = {name: None for name in names}
    for n_done, start in enumerate(starts):
        chunk = np.asarray(ids[start:start + window], np.int64)[None]
        feed = {io.INPUT_IDS: chunk, io.ATTENTION_MASK: np.ones_like(chunk)}
        if gio.has_position_ids:
            feed[io.POSITION_IDS] = np.arange(chunk.shape[1], dtype=np.int64)[None]
        feed.update(gio.keep(1))
        empty = np.zeros((1, gio.num_kv_heads, 0, gio.head_dim), gio.kv_dtype)
        for i in range(gio.num_layers):
            feed[io.past_key(i)] = feed[io.past_value(i)] = empty
        values = session.run(names, feed)
        for name, x in zip(names, values):
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            h = (x.T @ x).astype(np.float64)
            hessians[name] = h if hessians[name] is None else hessians[name] + h
        progress(n_done + 1, len(starts), "calibrate:windows")
    return hessians, len(ids)
