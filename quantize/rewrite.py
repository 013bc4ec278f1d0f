"""`edgellama quantize`: a float model folder -> a block-quantized one.

Every MatMul or Gemm whose weight is a 2-D float initializer becomes MatMulNBits; the
embedding Gather can become GatherBlockQuantized. Besides our own graphs this covers
optimum's (export --via optimum): weights stored (K, N) for MatMul or reached through a
Transpose of an (N, K) initializer, FusedMatMul(transB) on a tied table, Gemm with transB
either way and a bias, one initializer shared by several nodes (quantized and stored once).
A weight whose output size is the vocabulary is the lm_head (--lm-head). Each weight is
read from the memory-mapped source, quantized and written before the next is read.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgellama.buildkit.graph_writer import MS, GraphWriter
from edgellama.buildkit.output import atomic_folder, check_not_source, check_target, copy_model_files
from edgellama.buildkit.quant_nodes import gather_block_quantized, matmul_nbits, write_weight
from edgellama.buildkit.quant_options import QuantOptions
from edgellama.buildkit.schemes import GPTQ_FORMS, BlockQuant, quantize
from edgellama.runtime import contract as io
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError, BadModelFileError
from edgellama.runtime.external_data import check_external_data

from .gptq import gptq

_FLOATS = {TensorProto.FLOAT: np.float32, TensorProto.FLOAT16: np.float16}


Progress = Callable[[int, int, str], None]  # (done, total, what)
WRITE_STEPS = 3  # the weights file finished, the graph, the manifest


def quantize_folder(src: Path, out: Path, options: QuantOptions,
                    progress: Progress = lambda done, total, what: None) -> Manifest:
    """Write `out`, a block-quantized copy of the float folder `src`; all or nothing.

    Progress phases: "calibrate:windows" (calibrated methods only), "fit:tensors" (each
    distinct weight quantized; the total is the manifest's quantized_weights), "write"."""
    src, out = Path(src), Path(out)
    check_not_source(src, out)
    check_target(out, options.force)
    manifest = Manifest.load(src)
    if manifest.quantization:
        raise BadArgumentError(f"{src}: this model is already quantized ({manifest.weights}); "
                               "quantize the float export instead")
    check_external_data(src / io.GRAPH_NAME)
    model = onnx.load(str(src / io.GRAPH_NAME), load_external_data=False)
    reader = InitializerReader(src, model.graph)
    targets = _targets(model.graph, reader, options, manifest.vocab_size)
    hessians = _calibrate(src, model, targets, options, progress) if options.calibrated else {}
    wider: list[str] = []
    fitted: dict[tuple, BlockQuant] = {}  # 4-bit fits the mixed choice already made, by _weight_key
    if options.mixed:  # some 4-bit projections get 8 bits (a preset's share or --size-budget)
        targets, wider, fitted = _mix(src, model, targets, reader, hessians, options, progress)
    with atomic_folder(out, force=options.force) as tmp:
        copy_model_files(src, tmp, {io.GRAPH_NAME, io.GRAPH_DATA_NAME, io.MANIFEST_NAME})
        with open(tmp / io.GRAPH_DATA_NAME, "wb") as data:
            g = GraphWriter(data, io.GRAPH_DATA_NAME, prefix="quant/")  # apart from the copied nodes' names
            errors = _rewrite(model.graph, targets, reader, g, options, np.dtype(manifest.kv_numpy_dtype),
                              progress, hessians, fitted)
            progress(0, WRITE_STEPS, "write")
            _keep_float_initializers(model.graph, reader, g)
        progress(1, WRITE_STEPS, "write")
        _finish(model, g)
        onnx.save_model(model, str(tmp / io.GRAPH_NAME))
        progress(2, WRITE_STEPS, "write")
        new = replace(manifest, weights=f"int{options.bits}", quantization=options.record(errors, wider=wider))
        (tmp / io.MANIFEST_NAME).write_text(new.to_json(), encoding="utf-8")
        progress(3, WRITE_STEPS, "write")
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


class _Target(NamedTuple):
    kind: str  # "matmul" | "gather"
    weight: str  # initializer name
    layout: str  # "kn": stored (K, N) as MatMul reads it | "nk": stored (N, K), as Gemm(transB) and Gather read it
    bits: int
    bias: str | None = None  # Gemm's C
    head: bool = False  # the lm_head: a matmul whose output size is the vocabulary


def _targets(graph: onnx.GraphProto, reader: InitializerReader, opt: QuantOptions,
             vocab: int) -> list[_Target | None]:
    """What to quantize for each node of the graph, in order (None: kept as it is)."""
    transposed = _transposed_weights(graph, reader)
    return [_quantizable(node, reader, opt, transposed, vocab) for node in graph.node]


def _weight_key(target: _Target) -> tuple:
    """One quantized weight per (initializer, layout, bits): a tied table read by the embedding
    Gather and by the lm_head is quantized and stored once."""
    return target.weight, target.layout, target.bits


def _fresh_count(targets: list[_Target | None]) -> int:
    """How many weights get quantized, as _emit stores them."""
    return len({_weight_key(t) for t in targets if t is not None})


def _calibrate(src: Path, model: onnx.ModelProto, targets: list[_Target | None], opt: QuantOptions,
               progress: Progress) -> dict[str, np.ndarray]:
    """Input statistics (sum of x x^T) for every projection that gets quantized and for the lm_head
    (its statistics weigh the vocabulary table's fit, see _rewrite).

    GPTQ reads the whole matrix; the activation-weighted fits (mse, mse-zp) and the
    mixed-precision choice read only its diagonal, so only that is collected for them: (K,) per
    input instead of (K, K) float64 (SmolLM2-135M: 0.8 GB less, and most of calibration's
    arithmetic). _rewrite hands a diagonal on as a zero-copy (K, K) view whose diagonal it is."""
    from .calibrate import collect_hessians

    inputs = {node.input[0] for node, target in zip(model.graph.node, targets) if _calibrated(target)}
    text = None
    if opt.calibration is not None:
        path = Path(opt.calibration)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise BadArgumentError(f"--calibration {path}: cannot read it as UTF-8 text ({exc})") from None
    full = opt.method == "gptq"
    hessians, _ = collect_hessians(src, model, inputs, text, opt.calibration_tokens, progress=progress,
                                   diagonal=not full)
    return hessians


def _mix(src: Path, model: onnx.ModelProto, targets: list[_Target | None], reader: InitializerReader,
         hessians: dict[str, np.ndarray], opt: QuantOptions, progress: Progress
         ) -> tuple[list[_Target | None], list[str], dict[tuple, BlockQuant]]:
    """Targets with the chosen 4-bit projections at 8 bits (quantize/mixed.py), their names, and
    the 4-bit fits of the others by their new _weight_key (what _emit would fit again)."""
    from .mixed import choose, measure

    mixable: dict[tuple, tuple[_Target, str]] = {}
    for node, t in zip(model.graph.node, targets):
        if _projection(t) and t.bits == 4:
            mixable.setdefault(_weight_key(t), (t, node.input[0]))
    weights = [(key, t.weight, lambda t=t: _read(reader, t), hessians.get(x)) for key, (t, x) in mixable.items()]
    outputs = [node.output[0] for node, t in zip(model.graph.node, targets) if _projection(t) and t.bits == 4]
    candidates, fits4 = measure(weights, opt, progress, relative=_normalized_outputs(model.graph, outputs))
    budget = None if opt.size_budget_mb is None else int(opt.size_budget_mb * 1e6)
    chosen = choose(candidates, _fixed_bytes(src, model, reader, targets, set(mixable), opt), budget, opt.mixed_share)
    new = [t._replace(bits=8) if t is not None and _weight_key(t) in chosen else t for t in targets]
    # GPTQ fits again on its own (the measured fits are the plain ones the ranking needs)
    kept = {} if opt.method == "gptq" else {key: bq for key, bq in fits4.items() if key not in chosen}
    return new, [c.name for c in candidates if c.key in chosen], kept


_NORMS = {"SimplifiedLayerNormalization", "LayerNormalization", "RMSNormalization"}


def _normalized_outputs(graph: onnx.GraphProto, outputs: list[str]) -> bool:
    """Whether some projection's output is normalized on its own before it reaches anything else
    (through Split / Reshape): Gemma 3's q/k norms and the norms after attention and MLP. A
    residual add fused with the next norm (SkipSimplifiedLayerNormalization) does not count."""
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    todo = list(outputs)
    while todo:
        for n in consumers.get(todo.pop(), []):
            if n.op_type in _NORMS:
                return True
            if n.op_type in ("Split", "Reshape"):
                todo.extend(n.output)
    return False


def _fixed_bytes(src: Path, model: onnx.ModelProto, reader: InitializerReader, targets: list[_Target | None],
                 mixable: set[tuple], opt: QuantOptions) -> int:
    """The most the output folder takes besides the mixable projections: the copied files,
    the graph, the float initializers kept and the weights whose bits are fixed."""
    from edgellama.buildkit.graph_writer import stored_size

    from .mixed import quantized_bytes

    total = sum(f.stat().st_size for f in src.iterdir() if f.is_file() and f.name != io.GRAPH_DATA_NAME)
    total += 2 * (src / io.GRAPH_NAME).stat().st_size  # the rewritten graph has more nodes than the float one
    quantized = {t.weight for t in targets if t is not None}
    used = _used_names(model.graph.node)
    for name, proto in reader.protos.items():
        if name in used and name not in quantized:
            itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(proto.data_type)).itemsize
            total += stored_size(int(np.prod(proto.dims, dtype=np.int64)) * itemsize)
    fixed = {_weight_key(t): t for t in targets if t is not None and _weight_key(t) not in mixable}
    for t in fixed.values():
        n, k = reader.protos[t.weight].dims[::-1] if t.layout == "kn" else reader.protos[t.weight].dims
        total += quantized_bytes(n, k, t.bits, opt.block_for(t.kind == "gather" or t.head), opt.scheme_for(t.bits))
    return total


def _read(reader: InitializerReader, target: _Target) -> np.ndarray:
    """The target's weight as (N, K) float32: blocks run along K."""
    w = np.asarray(reader.array(target.weight), dtype=np.float32)
    return w.T if target.layout == "kn" else w


def _calibrated(target: _Target | None) -> bool:
    """A MatMul-like target, the lm_head included: the weights whose inputs calibration records."""
    return target is not None and target.kind == "matmul"


def _projection(target: _Target | None) -> bool:
    """A MatMul-like target that is not the lm_head: the weights calibration applies to."""
    return target is not None and target.kind == "matmul" and not target.head


def _rewrite(graph: onnx.GraphProto, targets: list[_Target | None], reader: InitializerReader, g: GraphWriter,
             opt: QuantOptions, dtype: np.dtype, progress: Progress,
             hessians: dict[str, np.ndarray] | None = None, fitted: dict[tuple, BlockQuant] | None = None
             ) -> list[float]:
    """Re-emit every node into g, quantizing weights on the way; returns their relative errors,
    one per weight quantized (progress "fit:tensors" counts them)."""
    total, errors, sums, done = _fresh_count(targets), [], {}, {}
    progress(0, total, "fit:tensors")
    # A vocabulary table's fit is weighed by the lm_head's input statistics, also where the
    # embedding Gather reaches the (tied, stored once) table first.
    head_input = {_weight_key(t): node.input[0] for node, t in zip(graph.node, targets) if t is not None and t.head}
    for node, target in zip(graph.node, targets):
        if target is None:
            g.nodes.append(node)
            continue
        x = node.input[0] if _projection(target) else head_input.get(_weight_key(target))
        hessian = (hessians or {}).get(x) if x is not None else None
        if hessian is not None and hessian.ndim == 1:  # a diagonal only (_calibrate): np.diag of this view gives it back
            hessian = np.broadcast_to(hessian, (len(hessian), len(hessian)))
        fit = (fitted or {}).pop(_weight_key(target), None)
        fresh = _emit(node, target, reader, g, opt, dtype, sums, done, hessian, fit)
        errors.extend(fresh)
        if fresh:
            progress(len(errors), total, "fit:tensors")
    return errors


def _keep_float_initializers(graph: onnx.GraphProto, reader: InitializerReader, g: GraphWriter) -> None:
    """Drop the Transposes of weights nothing reads any more, and copy the float initializers
    the nodes still use (norms, rope tables, a kept table ...) into g."""
    transposed = _transposed_weights(graph, reader)
    used = _used_names(g.nodes) | {o.name for o in graph.output}
    g.nodes[:] = [n for n in g.nodes if not (n.op_type == "Transpose" and n.output[0] in transposed
                                             and n.output[0] not in used)]
    written = {t.name for t in g.initializers}
    for name in sorted(_used_names(g.nodes)):  # float initializers still used (norms, rope tables, a kept table ...)
        if name in reader.protos and name not in written:
            _copy_initializer(reader, g, name)


def _transposed_weights(graph: onnx.GraphProto, reader: InitializerReader) -> dict[str, str]:
    """{Transpose output: its (N, K) float initializer} for 2-D Transposes of weights."""
    out = {}
    for n in graph.node:
        perm = next((list(helper.get_attribute_value(a)) for a in n.attribute if a.name == "perm"), [1, 0])
        if n.op_type == "Transpose" and reader.is_float_matrix(n.input[0]) and perm == [1, 0]:
            out[n.output[0]] = n.input[0]
    return out


def _used_names(nodes) -> set[str]:
    """Every value the nodes read, subgraphs (If / Loop bodies) included."""
    names: set[str] = set()
    for n in nodes:
        names.update(n.input)
        for a in n.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for sub in subgraphs:
                names |= _used_names(sub.node)
    return names


def _quantizable(node, reader: InitializerReader, opt: QuantOptions, transposed: dict[str, str],
                 vocab: int) -> _Target | None:
    """What to quantize for this node, or None to keep it as it is."""
    target = None
    if node.op_type == "MatMul" and reader.is_float_matrix(node.input[1]):
        target = _Target("matmul", node.input[1], "kn", 0)
    elif node.op_type == "MatMul" and node.input[1] in transposed:
        target = _Target("matmul", transposed[node.input[1]], "nk", 0)
    elif node.op_type == "FusedMatMul" and node.domain == MS and reader.is_float_matrix(node.input[1]):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}  # a tied lm_head (via_optimum.py)
        if attrs == {"transB": 1} or attrs == {"transB": 1, "transA": 0, "alpha": 1.0}:
            target = _Target("matmul", node.input[1], "nk", 0)
    elif node.op_type == "Gemm" and reader.is_float_matrix(node.input[1]):
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        if not attrs.get("transA") and attrs.get("alpha", 1.0) == 1.0 and (bias is None or attrs.get("beta", 1.0) == 1.0):
            target = _Target("matmul", node.input[1], "nk" if attrs.get("transB") else "kn", 0, bias)
    elif node.op_type == "Gather" and reader.is_float_matrix(node.input[0]):
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        bits = opt.table_bits("embeddings")
        return _Target("gather", node.input[0], "nk", bits) if bits and axis == 0 else None
    if target is None:
        return None
    head = reader.protos[target.weight].dims[1 if target.layout == "kn" else 0] == vocab
    bits = opt.table_bits("lm_head") if head else opt.bits
    return target._replace(bits=bits, head=head) if bits else None


def _emit(node, target: _Target, reader: InitializerReader, g: GraphWriter, opt: QuantOptions, dtype: np.dtype,
          sums: dict, done: dict, hessian: np.ndarray | None = None, fit: BlockQuant | None = None) -> list[float]:
    """Write the quantized node(s); the error of each newly quantized weight (none for a shared one).
    `fit`: the weight's fit when one was already made (quantize/mixed.py measured it)."""
    key = _weight_key(target)
    fresh = key not in done
    if fresh:
        w = _read(reader, target)
        scheme = opt.scheme_for(target.bits)
        block = opt.block_for(table=target.kind == "gather" or target.head)
        if fit is not None:
            bq = fit
        elif hessian is not None and opt.method == "gptq":
            bq = gptq(w, hessian, target.bits, block, GPTQ_FORMS[scheme])
        elif hessian is not None:  # activation-weighted least squares: E[x_k^2] weighs column k
            bq = quantize(w, target.bits, block, scheme, importance=np.diag(hessian))
        else:
            bq = quantize(w, target.bits, block, scheme)
        bq = bq.with_half_scales() if dtype == np.float32 else bq
        name = g.fresh(target.weight.replace("/", "_").replace(":", "_"))
        done[key] = (write_weight(g, bq, name, dtype), bq.error(w))
    qw, error = done[key]
    name = qw.qweight.removesuffix(".qweight")
    if target.kind == "gather":
        gather_block_quantized(g, qw, node.input[1], name, dtype, out=node.output[0])
    elif target.bias is None:
        matmul_nbits(g, node.input[0], qw, name, dtype, opt.accuracy_level, out=node.output[0], block_sums=sums)
    else:
        y = matmul_nbits(g, node.input[0], qw, name, dtype, opt.accuracy_level, block_sums=sums)
        g.op("Add", [y, target.bias], outputs=[node.output[0]])
    return [error] if fresh else []


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
