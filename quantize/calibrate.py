"""Input statistics for calibrated quantization: H = sum over calibration tokens of x x^T, for
the input x of every weight that will be quantized, from one run of the float graph over a text.

The graph is re-saved (in memory, its weights read from the model folder, never copied) with
those inputs as its only outputs and the nodes nothing of them needs (the final norm, the
lm_head) left out, and run window by window with an empty KV cache. Each window's
activations are folded into the running sums and dropped before the next window runs, so
what is held is one window's activations and the sums. (The session keeps onnxruntime's
weight prepacking: with it off the float MatMuls take another path whose sums differ in the
last bits, and peak memory measured the same, since the weights are then paged in from the
memory-mapped file instead: SmolLM2-135M fp32, 0.90 GB either way.)

`diagonal=True` keeps only diag(H) = the sum of x_k^2 per input column (what the
activation-weighted fits read): (K,) instead of (K, K) per input, and a fraction of the
arithmetic. It is computed as the diagonal of x^T x taken in column blocks, which matches
the diagonal of the full product bit for bit with the BLAS numpy ships (checked in
tests/test_quantize_memory.py).
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
from edgellama.runtime.errors import BadArgumentError, BadModelFileError
from edgellama.runtime.session import make_session

WINDOW = 512
DEFAULT_TOKENS = 4096
_DIAG_BLOCK = 64  # columns per block of the diagonal's products


def default_text() -> str:
    """The calibration text shipped with edgellama: English technical prose and Python code
    (docstrings and sources of the Python standard library, PSF licence), about 4,300
    SmolLM2 tokens. It shares nothing with the evaluation text (GPL-3)."""
    return resources.files("edgellama.quantize").joinpath("data/calibration.txt").read_text(encoding="utf-8")


def collect_hessians(folder: Path, model: onnx.ModelProto, inputs: set[str], text: str | None,
                     max_tokens: int = DEFAULT_TOKENS, threads: int | None = None,
                     progress: Callable[[int, int, str], None] = lambda done, total, what: None,
                     diagonal: bool = False) -> tuple[dict[str, np.ndarray], int]:
    """{tensor name: (K, K) float64 sum of x x^T} (or its diagonal, (K,), with diagonal=True),
    and the number of tokens seen."""
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
    names = sorted(inputs)
    elem = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[manifest.kv_numpy_dtype]
    probe = _probe(model, names, elem)
    starts = list(range(0, len(ids) - 1, window))
    progress(0, len(starts), "calibrate:windows")  # before the session: creating it takes a while
    session = make_session(probe.SerializeToString(), "cpu", threads, external_data_folder=folder)
    del probe
    feeds = _Feeds(session, folder, manifest.num_kv_heads, manifest.head_dim)
    sums: dict[str, np.ndarray | None] = {name: None for name in names}
    for n_done, start in enumerate(starts):
        values = session.run(names, feeds(ids[start:start + window]))
        for i, name in enumerate(names):
            x, values[i] = values[i], None  # each window's activations go as soon as they are summed
            x = np.asarray(x, np.float32).reshape(-1, x.shape[-1])
            h = (_gram_diagonal(x) if diagonal else x.T @ x).astype(np.float64)
            sums[name] = h if sums[name] is None else sums[name] + h
            del x, h
        del values
        progress(n_done + 1, len(starts), "calibrate:windows")
    del session
    return sums, len(ids)


def _gram_diagonal(x: np.ndarray) -> np.ndarray:
    """diag(x^T x) as float32, as the full product computes it: x^T x for a few columns at a
    time (numpy hands a product of an array with its own transpose to BLAS syrk, and the
    diagonal of a block is summed in the same order as in the whole)."""
    k = x.shape[1]
    return np.concatenate([np.diagonal(x[:, j:j + _DIAG_BLOCK].T @ x[:, j:j + _DIAG_BLOCK])
                           for j in range(0, k, _DIAG_BLOCK)])


def _probe(model: onnx.ModelProto, names: list[str], elem: int) -> onnx.ModelProto:
    """The graph computing only `names`: those as its outputs, and the nodes they need."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)  # the caller's graph stays untouched
    graph = probe.graph
    need, keep = set(names), []
    for node in reversed(graph.node):
        if any(o in need for o in node.output):
            keep.append(node)
            need.update(_reads(node))
    missing = set(names) - {o for n in keep for o in n.output} - {i.name for i in graph.input}
    if missing:
        raise BadModelFileError(f"calibration: no node computes {sorted(missing)[0]!r}")
    del graph.output[:]
    graph.output.extend(helper.make_tensor_value_info(name, elem, None) for name in names)
    kept = [onnx.NodeProto() for _ in keep]
    for new, old in zip(kept, reversed(keep)):
        new.CopyFrom(old)
    del graph.node[:]
    graph.node.extend(kept)
    return probe


def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads, those its subgraphs (If / Loop bodies) read included."""
    names = {i for i in node.input if i}
    for a in node.attribute:
        for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in sub.node:
                names |= _reads(n)
    return names


class _Feeds:
    """The inputs of one uncached window, for the inputs the probe session declares."""

    def __init__(self, session, folder: Path, kv_heads: int, head_dim: int):
        self.inputs = [(i.name, i.type, i.shape) for i in session.get_inputs()]
        self.folder, self.kv_heads, self.head_dim = folder, kv_heads, head_dim

    def __call__(self, window: list[int]) -> dict[str, np.ndarray]:
        chunk = np.asarray(window, np.int64)[None]
        feed = {}
        for name, kind, shape in self.inputs:
            if name == io.INPUT_IDS:
                feed[name] = chunk
            elif name == io.ATTENTION_MASK:
                feed[name] = np.ones_like(chunk)
            elif name == io.POSITION_IDS:
                feed[name] = np.arange(chunk.shape[1], dtype=np.int64)[None]
            elif name == io.LOGITS_TO_KEEP:
                feed[name] = np.ones(1, np.int64)
            elif name == io.LEGACY_LOGITS_TO_KEEP:
                feed[name] = np.array(1, np.int64)
            elif name.startswith("past_key_values."):
                dtype = {"tensor(float)": np.float32, "tensor(float16)": np.float16}.get(kind)
                if dtype is None:
                    raise BadModelFileError(f"{self.folder}: {name} has type {kind}; expected float or float16")
                heads, dim = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
                feed[name] = np.zeros((1, heads if isinstance(heads, int) else self.kv_heads, 0,
                                       dim if isinstance(dim, int) else self.head_dim), dtype)
            else:
                raise BadModelFileError(f"{self.folder}: the graph has an input {name!r} that calibration "
                                        "does not know how to feed")
        return feed
