"""`edgellama quantize`: a float model folder -> a block-quantized one.

Every MatMul (and our lm_head Gemm) whose weight is a 2-D float initializer becomes
MatMulNBits; the embedding Gather can become GatherBlockQuantized. Each weight is read
from the memory-mapped source, quantized and written before the next is read.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellama.exporter.graph import GraphWriter
from edgellama.exporter.output import atomic_folder, check_target
from edgellama.runtime import contract as io
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError, BadModelFileError

from .gptq import gptq
from .nodes import MS, gather_block_quantized, matmul_nbits
from .schemes import BITS, GPTQ_FORMS, METHODS, quantize, scheme_name

TABLE_CHOICES = ("keep", "int8", "int4")
ACCURACY_LEVELS = (0, 1, 2, 4)
_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


@dataclass(frozen=True)
class QuantOptions:
    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    method: str = "mse"
    accuracy_level: int = 4  # 4: int8 activations (MLAS' fast path on CPU); 0: float
    embeddings: str = "int8"
    # int8 by default: on SmolLM2 an int4 lm_head alone costs +7 % perplexity (measured).
    lm_head: str = "int8"  # or "same" as --bits, or one of TABLE_CHOICES
    force: bool = False
    calibration: str | None = None  # gptq: a text file; None = the text shipped with edgellama
    calibration_tokens: int = 4096

    def __post_init__(self) -> None:
        if self.bits not in BITS:
            raise BadArgumentError(f"--bits {self.bits} is not supported; choose 4 or 8")
        if self.method not in METHODS:
            raise BadArgumentError(f"--method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        scheme_name(self.method, self.symmetric)
        if self.accuracy_level not in ACCURACY_LEVELS:
            raise BadArgumentError(f"--accuracy-level {self.accuracy_level} is not one of {ACCURACY_LEVELS}")
        if self.calibration is not None and self.method != "gptq":
            raise BadArgumentError("--calibration is only used by --method gptq")
        if self.calibration_tokens < 64:
            raise BadArgumentError(f"--calibration-tokens {self.calibration_tokens}: use at least 64")
        for opt, value in (("--embeddings", self.embeddings), ("--lm-head", self.lm_head)):
            if value not in TABLE_CHOICES + (("same",) if opt == "--lm-head" else ()):
                raise BadArgumentError(f"{opt} {value!r}: choose one of {', '.join(TABLE_CHOICES)}")

    @property
    def scheme(self) -> str:
        return scheme_name(self.method, self.symmetric)

    def scheme_for(self, bits: int) -> str:
        """8-bit MatMulNBits with uint8 zero points lands on a slow CPU kernel (SmolLM2's int8
        lm_head: 20 ms a token instead of 7). The zero-point schemes are the no-extra-ops ones,
        so their 8-bit weights (the int8 vocabulary tables) take the symmetric grid, which needs
        no zero points and no float-min correction either; at 8 bits it costs little accuracy."""
        return "rtn-symmetric" if bits == 8 and self.scheme.endswith("-zeropoint") else self.scheme

    def table_bits(self, which: str) -> int | None:
        """Bits for the embedding table or lm_head; None keeps it float."""
        choice = self.lm_head if which == "lm_head" else self.embeddings
        if choice == "same":
            return self.bits
        return None if choice == "keep" else int(choice[3:])

    def record(self, errors: list[float], exact_from_source: int | None = None) -> dict:
        """The manifest's `quantization` entry: these options and what quantizing cost."""
        d = asdict(self)
        d.pop("force")
        if self.method != "gptq":
            d.pop("calibration")
            d.pop("calibration_tokens")
        else:
            d["calibration"] = Path(self.calibration).name if self.calibration else "edgellama calibration.txt"
        d["scheme"] = self.scheme
        d["lm_head"] = "keep" if self.table_bits("lm_head") is None else f"int{self.table_bits('lm_head')}"
        d["mean_relative_error"] = float(np.mean(errors)) if errors else 0.0
        d["quantized_weights"] = len(errors)
        if exact_from_source is not None:
            d["exact_from_source"] = exact_from_source
        return d


Progress = Callable[[int, int, str], None]


def quantize_folder(src: Path, out: Path, options: QuantOptions,
                    progress: Progress = lambda done, total, what: None) -> Manifest:
    src, out = Path(src), Path(out)
    check_target(out, options.force)
    manifest = Manifest.load(src)
    if manifest.quantization:
        raise BadArgumentError(f"{src}: this model is already quantized ({manifest.weights}); "
                               "quantize the float export instead")
    model = onnx.load(str(src / io.GRAPH_NAME), load_external_data=False)
    reader = InitializerReader(src, model.graph)
    hessians = _calibrate(src, model, reader, options, progress) if options.method == "gptq" else {}
    with atomic_folder(out, force=options.force) as tmp:
        for f in src.iterdir():
            if f.is_file() and f.name not in (io.GRAPH_NAME, io.GRAPH_DATA_NAME, io.MANIFEST_NAME):
                shutil.copy2(f, tmp / f.name)
        with open(tmp / io.GRAPH_DATA_NAME, "wb") as data:
            g = GraphWriter(data, io.GRAPH_DATA_NAME, prefix="quant/")  # apart from the copied nodes' names
            errors = _rewrite(model.graph, reader, g, options, np.dtype(manifest.kv_numpy_dtype), progress, hessians)
        _finish(model, g)
        onnx.save_model(model, str(tmp / io.GRAPH_NAME))
        new = replace(manifest, weights=f"int{options.bits}", quantization=options.record(errors))
        (tmp / io.MANIFEST_NAME).write_text(new.to_json(), encoding="utf-8")
    return new


class InitializerReader:
    """Initializers by name; external data memory-mapped, confined to the model folder."""

    def __init__(self, folder: Path, graph: onnx.GraphProto):
        self.folder = folder.resolve()
        self.protos = {t.name: t for t in graph.initializer}

    def is_float_matrix(self, name: str) -> bool:
        t = self.protos.get(name)
        return t is not None and t.data_type in _FLOATS and len(t.dims) == 2

    def array(self, name: str) -> np.ndarray:
        t = self.protos[name]
        if t.data_location != TensorProto.EXTERNAL:
            return numpy_helper.to_array(t)
        info = {e.key: e.value for e in t.external_data}
        path = (self.folder / info.get("location", "")).resolve()
        if self.folder not in path.parents:
            raise BadModelFileError(f"{self.folder}: initializer {name!r} points outside the model folder "
                                    f"({info.get('location')!r}); refusing to read it")
        dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
        count = int(np.prod(t.dims, dtype=np.int64))
        offset = int(info.get("offset", 0))
        if not path.is_file() or offset + count * dtype.itemsize > path.stat().st_size:
            raise BadModelFileError(f"{path}: external data for {name!r} is missing or truncated; re-export the model")
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=tuple(t.dims))


def _calibrate(src: Path, model: onnx.ModelProto, reader: InitializerReader, opt: QuantOptions,
               progress: Progress) -> dict[str, np.ndarray]:
    """GPTQ's input statistics for every weight that gets quantized to --bits."""
    from .calibrate import collect_hessians

    head_weights = {n.input[1] for n in model.graph.node if n.op_type == "Gemm"}
    inputs = set()
    for node in model.graph.node:
        target = _quantizable(node, reader, opt, head_weights)
        if target is not None and target[0] == "matmul" and node.input[1] not in head_weights:
            inputs.add(node.input[0])  # the projections; the vocabulary tables keep their scheme
    text = None
    if opt.calibration is not None:
        path = Path(opt.calibration)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadArgumentError(f"--calibration {path}: cannot read it as UTF-8 text ({exc})") from None
    hessians, _ = collect_hessians(src, model, inputs, text, opt.calibration_tokens, progress=progress)
    return hessians


def _rewrite(graph: onnx.GraphProto, reader: InitializerReader, g: GraphWriter, opt: QuantOptions,
             dtype: np.dtype, progress: Progress, hessians: dict[str, np.ndarray] | None = None) -> list[float]:
    """Re-emit every node into g, quantizing weights on the way; returns relative errors."""
    head_weights = {n.input[1] for n in graph.node if n.op_type == "Gemm"}
    total, errors, sums = len(graph.node), [], {}
    kept: set[str] = set()
    for i, node in enumerate(graph.node):
        target = _quantizable(node, reader, opt, head_weights)
        if target is None:
            g.nodes.append(node)
            kept.update(node.input)
        else:
            hessian = (hessians or {}).get(node.input[0]) if target[0] == "matmul" and node.input[1] not in head_weights else None
            errors.append(_emit(node, target, reader, g, opt, dtype, sums, hessian))
        progress(i + 1, total, "nodes")
    written = {t.name for t in g.initializers}
    for name in kept:  # float initializers still used (norms, rope tables, a kept table ...)
        if name in reader.protos and name not in written:
            _copy_initializer(reader, g, name)
    return errors


def _quantizable(node, reader: InitializerReader, opt: QuantOptions, head_weights: set[str]):
    """(kind, weight name, bits) if this node's weight should be quantized, else None."""
    if node.op_type == "MatMul" and reader.is_float_matrix(node.input[1]):
        bits = opt.table_bits("lm_head") if node.input[1] in head_weights else opt.bits
        return ("matmul", node.input[1], bits) if bits else None
    if node.op_type == "Gemm" and reader.is_float_matrix(node.input[1]) and len(node.input) == 2:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if attrs.get("transB") == 1 and attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA"):
            bits = opt.table_bits("lm_head")
            return ("gemm", node.input[1], bits) if bits else None
    if node.op_type == "Gather" and reader.is_float_matrix(node.input[0]):
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        bits = opt.table_bits("embeddings")
        return ("gather", node.input[0], bits) if bits and axis == 0 else None
    return None


def _emit(node, target, reader: InitializerReader, g: GraphWriter, opt: QuantOptions, dtype: np.dtype,
          sums: dict, hessian: np.ndarray | None = None) -> float:
    kind, wname, bits = target
    w = np.asarray(reader.array(wname), dtype=np.float32)
    w = w.T if kind == "matmul" else w  # MatMul holds (K, N); Gemm(transB) and Gather hold (N, K)
    scheme = opt.scheme_for(bits)
    if hessian is not None and kind != "gather":
        bq = gptq(w, hessian, bits, opt.block_size, GPTQ_FORMS[scheme])
    else:
        bq = quantize(w, bits, opt.block_size, scheme)
    name = g.fresh(wname.replace("/", "_"))
    if kind == "gather":
        gather_block_quantized(g, bq, node.input[1], name, dtype, out=node.output[0])
    else:
        matmul_nbits(g, node.input[0], bq, name, dtype, opt.accuracy_level, out=node.output[0], block_sums=sums)
    return bq.error(w)


def _copy_initializer(reader: InitializerReader, g: GraphWriter, name: str) -> None:
    proto = reader.protos[name]
    if proto.data_location == TensorProto.EXTERNAL:
        g.weight(name, np.ascontiguousarray(reader.array(name)))
    else:
        g.initializers.append(proto)


def _finish(model: onnx.ModelProto, g: GraphWriter) -> None:
    graph = model.graph
    del graph.node[:]
    graph.node.extend(g.nodes)
    del graph.initializer[:]
    graph.initializer.extend(g.initializers)
    if not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))
