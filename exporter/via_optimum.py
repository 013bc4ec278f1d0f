"""`edgellama export --via optimum`: optimum traces the decoder, edgellama writes the folder.

For decoder-only architectures the native builder (graph.py) does not cover (Phi-3, Gemma,
Qwen3, OLMo-2, ...). optimum's `text-generation-with-past` export already speaks the
contract's I/O names; this module runs it in-process — torch, transformers and optimum are
imported here and nowhere else in the package — and then:

  * checks the traced graph against the contract (runtime/contract.py): input_ids,
    attention_mask, optional position_ids, past_key_values.{i}.key|value
    (batch, kv_heads, past_seq, head_dim) -> logits, present.{i}.key|value;
  * casts fp16 logits to float32 (the contract's logits dtype);
  * moves the weights into page-aligned model.onnx.data;
  * writes the tokenizer files and chat template, edgellama.json (``via: "optimum"``) and,
    for the model types onnxruntime-genai knows, genai_config.json.

The graph keeps optimum's standard attention ops (kv_buffer "concat"). Unlike the native
path, the whole model is in memory while it is traced (torch needs it there).
"""

from __future__ import annotations

import contextlib
import json
import logging
import platform
import re
import shutil
import sys
import tempfile
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import edgellama
from edgellama.buildkit.graph_writer import MS, GraphWriter
from edgellama.buildkit.output import atomic_folder, check_target
from edgellama.runtime import contract as io
from edgellama.runtime.adapters import genai_config
from edgellama.runtime.contract import KVLayout, Manifest, read_json_object
from edgellama.runtime.errors import BadArgumentError, BadModelFileError, UnsupportedModelError

from .checkpoint import hf_weight_files, sha256_file
from .tokenizer import TokenizerFiles, write_tokenizer
from .tokenizer_hf import tokenizer_from_hf

TASK = "text-generation-with-past"
INSTALL_HINT = "install it with: pip install 'optimum-onnx>=0.1' (the optimum extra)"
# HF model_type values that onnxruntime-genai (0.8+) runs as a plain decoder: genai_config.json is
# written for these only.
GENAI_TYPES = frozenset({"llama", "mistral", "phi", "phi3", "gemma", "gemma2", "gemma3_text", "qwen2", "qwen3",
                         "olmo", "granite", "nemotron", "smollm3"})
_MIN_EXTERNAL_BYTES = 1024  # smaller initializers stay inside model.onnx
_LAYER = re.compile(r"\.(\d+)\.")


def export_via_optimum(source: Path, out_dir: Path, options, progress) -> Manifest:
    """Write `out_dir` from a HF folder through optimum's tracer; all or nothing.

    `options` is exporter.export.ExportOptions; with options.quant the float folder is
    written beside the target first and quantized into it by the quantize package's `quantize_folder`.

    Progress phases: "trace" (optimum's export, one step), "save:tensors" (the traced weights
    moved into model.onnx.data), "write"; with options.quant then quantize_folder's own."""
    source, out_dir = Path(source), Path(out_dir)
    check_target(out_dir, options.force)
    if options.attention != "auto":
        raise BadArgumentError(f"--attention {options.attention} applies to the native exporter; "
                               "--via optimum keeps optimum's standard attention ops")
    config, weights = _read_source(source)
    tracer = _Tracer.load()
    tracer.check_supported(config, source / "config.json")
    tokenizer = tokenizer_from_hf(source)
    if options.quant is None:
        with atomic_folder(out_dir, force=options.force) as tmp:
            return _write_float(source, config, weights, tokenizer, tracer, options.dtype, tmp, progress)
    from edgellama.quantize import quantize_folder

    with tempfile.TemporaryDirectory(prefix=f".{out_dir.name}.", suffix=".float", dir=out_dir.absolute().parent) as work:
        float_dir = Path(work)
        _write_float(source, config, weights, tokenizer, tracer, options.dtype, float_dir, progress,
                     last="float write")  # not the quantized folder's "write"
        return quantize_folder(float_dir, out_dir, replace(options.quant, force=options.force), progress)


def _read_source(source: Path) -> tuple[dict[str, Any], list[Path]]:
    if not source.exists():
        raise BadModelFileError(f"{source}: no such folder; give a Hugging Face model folder")
    if not source.is_dir():
        raise BadArgumentError(f"{source}: --via optimum reads Hugging Face folders (config.json + safetensors), "
                               "not single files; export a GGUF without --via")
    config = read_json_object(source / "config.json", "config.json")
    if config.get("auto_map"):
        raise UnsupportedModelError(f"{source / 'config.json'}: this model needs its own Python code (auto_map), "
                                    "which edgellama never runs")
    return config, hf_weight_files(source)  # refuses pickle-only folders


class _Tracer:
    """optimum's exporter, imported on first use."""

    def __init__(self, main_export, tasks_manager, versions: dict[str, str]):
        self.main_export, self.tasks, self.versions = main_export, tasks_manager, versions

    @classmethod
    def load(cls) -> "_Tracer":
        try:
            import optimum.version
            import torch
            import transformers
            from optimum.exporters.onnx import main_export
            from optimum.exporters.tasks import TasksManager
        except ImportError as exc:
            raise BadArgumentError(f"--via optimum needs optimum-onnx and torch ({exc.name or exc} is not "
                                   f"installed); {INSTALL_HINT}") from None
        versions = {"optimum": optimum.version.__version__, "transformers": transformers.__version__,
                    "torch": torch.__version__}
        return cls(main_export, TasksManager, versions)

    def check_supported(self, config: dict[str, Any], where: Path) -> None:
        model_type = config.get("model_type")
        if not isinstance(model_type, str):
            raise BadModelFileError(f"{where}: no 'model_type'; optimum needs it to pick the architecture")
        try:
            tasks = self.tasks.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
        except KeyError:
            tasks = {}
        if TASK not in tasks:
            raise UnsupportedModelError(f"{where}: model_type {model_type!r} is not supported by optimum "
                                        f"{self.versions['optimum']} for {TASK} either")

    def trace(self, source: Path, out: Path, dtype: str) -> None:
        """optimum's export of `source` into `out` (model.onnx [+ model.onnx_data]); its chatter goes to stderr."""
        loggers = [logging.getLogger(n) for n in ("optimum", "transformers", "torch.onnx")]
        levels = [lg.level for lg in loggers]
        try:
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            with warnings.catch_warnings(), contextlib.redirect_stdout(sys.stderr):
                warnings.simplefilter("ignore")
                self.main_export(str(source), str(out), task=TASK, device="cpu", dtype=dtype, do_validation=False,
                                 local_files_only=True, trust_remote_code=False, library_name="transformers")
        except (OSError, ValueError, KeyError, RuntimeError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise BadModelFileError(f"{source}: optimum could not export this model ({first})") from exc
        finally:
            for lg, level in zip(loggers, levels):
                lg.setLevel(level)


def _write_float(source: Path, config: dict[str, Any], weights: list[Path], tok: TokenizerFiles, tracer: _Tracer,
                 dtype: str, folder: Path, progress, last: str = "write") -> Manifest:
    progress(0, 1, "trace")
    scratch = folder / ".optimum"
    tracer.trace(source, scratch, dtype)
    model = onnx.load(str(scratch / "model.onnx"))  # with its external data, if any
    progress(1, 1, "trace")
    shape = _check_io(model.graph, scratch / "model.onnx")
    _logits_to_float32(model.graph)
    _share_tied_table(model)
    _save_aligned(model, folder, progress)
    del model
    shutil.rmtree(scratch)
    progress(0, 1, last)
    write_tokenizer(tok, folder)
    manifest = _manifest(config, shape, tok, dtype, source, weights, tracer.versions)
    (folder / io.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
    if config.get("model_type") in GENAI_TYPES:
        genai = genai_config(manifest, config["model_type"])
        (folder / io.GENAI_CONFIG_NAME).write_text(json.dumps(genai, indent=2) + "\n")
    progress(1, 1, last)
    return manifest


# ---- the traced graph ---------------------------------------------------------------------

def _dims(value: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def _check_io(graph: onnx.GraphProto, where: Path) -> dict[str, Any]:
    """The KV layout the graph declares: layers, kv_heads, head_dim, vocab, position_ids, I/O summary."""
    inputs = {v.name: v for v in graph.input}
    outputs = {v.name: v for v in graph.output}
    for name in (io.INPUT_IDS, io.ATTENTION_MASK, io.past_key(0)):
        if name not in inputs:
            raise UnsupportedModelError(f"{where}: optimum's graph has no input {name!r}; edgellama cannot run it")
    if io.LOGITS not in outputs:
        raise UnsupportedModelError(f"{where}: optimum's graph has no output {io.LOGITS!r}")
    layers = sum(1 for n in inputs if n.startswith("past_key_values.") and n.endswith(".key"))
    cache = [f(i) for i in range(layers) for f in (io.past_key, io.past_value)]
    present = [f(i) for i in range(layers) for f in (io.present_key, io.present_value)]
    known = {io.INPUT_IDS, io.ATTENTION_MASK, io.POSITION_IDS, *cache}
    if set(inputs) - known or any(n not in inputs for n in cache) or any(n not in outputs for n in present):
        extra = sorted(set(inputs) - known) or sorted(n for n in cache + present if n not in inputs and n not in outputs)
        raise UnsupportedModelError(f"{where}: optimum's graph has inputs/outputs edgellama does not feed or "
                                    f"expect ({', '.join(extra[:4])}); this architecture's cache is not supported")
    shape = _dims(inputs[io.past_key(0)])  # (batch, kv_heads, past_seq, head_dim)
    vocab = _dims(outputs[io.LOGITS])[-1]
    if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int) or not isinstance(vocab, int):
        raise UnsupportedModelError(f"{where}: past {shape} / logits vocab {vocab!r}: expected fixed kv_heads, "
                                    "head_dim and vocab axes")
    return {"layers": layers, "kv_heads": shape[1], "head_dim": shape[3], "vocab": vocab,
            "position_ids": io.POSITION_IDS in inputs, "io": _io_summary(graph)}


def _io_summary(graph: onnx.GraphProto) -> dict[str, dict[str, str]]:
    """{"inputs": {"past_key_values.{i}.key": "float32[batch_size, 2, past_sequence_length, 16]", ...}, ...}"""
    summary: dict[str, dict[str, str]] = {}
    for title, values in (("inputs", graph.input), ("outputs", graph.output)):
        entries: dict[str, str] = {}
        for v in values:
            dtype = helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name
            entries.setdefault(_LAYER.sub(".{i}.", v.name), f"{dtype}[{', '.join(map(str, _dims(v)))}]")
        summary[title] = entries
    return summary


def _logits_to_float32(graph: onnx.GraphProto) -> None:
    """An fp16 graph's logits become float32 through one Cast (the contract's logits dtype)."""
    out = next(v for v in graph.output if v.name == io.LOGITS)
    if out.type.tensor_type.elem_type == TensorProto.FLOAT:
        return
    inner = f"{io.LOGITS}_traced"
    for node in graph.node:
        node.output[:] = [inner if o == io.LOGITS else o for o in node.output]
        node.input[:] = [inner if i == io.LOGITS else i for i in node.input]
    graph.node.append(helper.make_node("Cast", [inner], [io.LOGITS], to=TensorProto.FLOAT, name="edgellama/logits_fp32"))
    out.type.tensor_type.elem_type = TensorProto.FLOAT


def _share_tied_table(model: onnx.ModelProto) -> None:
    """optimum's constant folding stores a tied lm_head a second time, transposed: (H, V) beside
    the (V, H) embedding table. Such a MatMul(x, copy) becomes FusedMatMul(x, table, transB=1)
    and the copy goes (SmolLM2: 113 MB less)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    tables = {n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in inits
              and len(inits[n.input[0]].dims) == 2}
    copies = set()
    for node in graph.node:
        w = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if w is None or len(w.dims) != 2:
            continue
        table = next((t for t in tables if list(inits[t].dims) == list(w.dims)[::-1] and inits[t].data_type == w.data_type
                      and np.array_equal(numpy_helper.to_array(inits[t]).T, numpy_helper.to_array(w))), None)
        if table is not None:
            copies.add(w.name)
            node.op_type, node.domain = "FusedMatMul", MS
            node.input[1] = table
            node.attribute.append(helper.make_attribute("transB", 1))
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name not in copies or t.name in used]
    if len(kept) < len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    if copies and not any(o.domain == MS for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS, 1))


def _save_aligned(model: onnx.ModelProto, folder: Path, progress=lambda done, total, what: None) -> None:
    """model.onnx + model.onnx.data, weights page-aligned like the native exporter's."""
    kept: list[TensorProto] = []
    total = len(model.graph.initializer)
    progress(0, total, "save:tensors")
    with open(folder / io.GRAPH_DATA_NAME, "wb") as data:
        g = GraphWriter(data, io.GRAPH_DATA_NAME)
        for i, t in enumerate(model.graph.initializer):
            arr = numpy_helper.to_array(t)
            if arr.nbytes >= _MIN_EXTERNAL_BYTES:
                g.weight(t.name, arr)
                t.ClearField("raw_data")  # free it as we go
            else:
                kept.append(t)
            progress(i + 1, total, "save:tensors")
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + g.initializers)
    onnx.save_model(model, str(folder / io.GRAPH_NAME))


# ---- the folder's description -------------------------------------------------------------

def _first(config: dict[str, Any], *keys: str, default: Any = None) -> Any:
    return next((config[k] for k in keys if isinstance(config.get(k), int) and config[k] > 0), default)


def _manifest(config: dict[str, Any], shape: dict[str, Any], tok: TokenizerFiles, dtype: str, source: Path,
              weights: list[Path], versions: dict[str, str]) -> Manifest:
    heads = _first(config, "num_attention_heads", "n_head")
    hidden = _first(config, "hidden_size", "n_embd", "d_model")
    if heads is None or hidden is None:
        raise BadModelFileError(f"{source / 'config.json'}: needs num_attention_heads and hidden_size")
    return Manifest(
        architecture=(config.get("architectures") or [str(config.get("model_type"))])[0],
        num_layers=shape["layers"], hidden_size=hidden, num_heads=heads, num_kv_heads=shape["kv_heads"],
        head_dim=shape["head_dim"], vocab_size=shape["vocab"],
        context_length=_first(config, "max_position_embeddings", "n_positions", "seq_length", default=2048),
        dtype=dtype, weights=dtype, attention="standard", kv_buffer=KVLayout.CONCAT.value,
        bos_token_id=tok.bos_token_id, eos_token_ids=list(tok.eos_token_ids), add_bos_token=tok.add_bos_token,
        has_position_ids=shape["position_ids"], via="optimum", graph_io=shape["io"],
        source={"path": source.name, "format": "hf", "model_type": config.get("model_type"),
                "sha256": {p.name: sha256_file(p) for p in weights}},
        tool={"name": "edgellama", "version": edgellama.__version__, "onnx": onnx.__version__,
              "python": platform.python_version(), "argv": sys.argv[1:], **versions},
    )
