"""`edgellama export`: checkpoint -> model folder (graph, weights, tokenizer, manifest)."""

from __future__ import annotations

import json
import platform
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

import edgellama
from edgellama.buildkit.output import atomic_folder, check_not_source, check_target
from edgellama.runtime import contract as io
from edgellama.runtime.adapters import genai_config
from edgellama.runtime.contract import KVLayout, Manifest
from edgellama.runtime.errors import BadArgumentError

from .checkpoint import Checkpoint, GGUFCheckpoint, open_checkpoint
from .config import ModelConfig
from .graph import GraphPlan, GraphWriter, build_decoder, choose_attention
from .tokenizer import TokenizerFiles, write_tokenizer

DTYPES = ("fp32", "fp16")
VIAS = ("native", "optimum")  # native: graph.py builds the graph; optimum: via_optimum.py traces it


@dataclass(frozen=True)
class ExportOptions:
    dtype: str = "fp32"
    force: bool = False
    attention: str = "auto"  # "auto" | "gqa" | "standard"
    quant: object | None = None  # buildkit.quant_options.QuantOptions: write a block-quantized graph directly
    via: str = "native"  # one of VIAS

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise BadArgumentError(f"--dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.attention not in ("auto", "gqa", "standard"):
            raise BadArgumentError(f"attention {self.attention!r}: choose auto, gqa or standard")
        if self.via not in VIAS:
            raise BadArgumentError(f"--via {self.via!r}: choose one of {', '.join(VIAS)}")
        if self.quant is not None and getattr(self.quant, "method", None) == "gptq":
            raise BadArgumentError("--method gptq needs the float graph's activations: export without --bits, "
                                   "then run `edgellama quantize --method gptq`")


Progress = Callable[[int, int, str], None]  # (done, total, what)
WRITE_STEPS = 3  # the graph, the tokenizer files, the manifest (and genai_config.json)


def export(source: Path, out_dir: Path, options: ExportOptions = ExportOptions(),
           progress: Progress = lambda done, total, what: None) -> Manifest:
    """Write `out_dir` from a HF folder or GGUF file; all or nothing.

    Progress phases: "build:layers" (decoder layers built, their weights written as they stream),
    then "write". --via optimum reports its own (see via_optimum.py)."""
    check_not_source(source, out_dir)
    if options.via == "optimum":
        from .via_optimum import export_via_optimum

        return export_via_optimum(source, out_dir, options, progress)
    source, out_dir = Path(source), Path(out_dir)
    check_target(out_dir, options.force)
    ckpt = open_checkpoint(source)
    try:
        ckpt.check_shapes()
        tok = ckpt.tokenizer()
        plan = _plan(ckpt.config, options)
        with atomic_folder(out_dir, force=options.force) as tmp:
            quant = _write_graph(ckpt, plan, tmp, progress, options.quant)
            progress(1, WRITE_STEPS, "write")
            write_tokenizer(tok, tmp)
            progress(2, WRITE_STEPS, "write")
            manifest = _manifest(ckpt, plan, tok, source, quant)
            (tmp / io.MANIFEST_NAME).write_text(manifest.to_json(), encoding="utf-8")
            (tmp / io.GENAI_CONFIG_NAME).write_text(json.dumps(genai_config(manifest), indent=2) + "\n")
            progress(3, WRITE_STEPS, "write")
        return manifest
    finally:
        ckpt.close()


def _plan(cfg: ModelConfig, options: ExportOptions) -> GraphPlan:
    attention, why = choose_attention(cfg)
    if options.attention == "gqa" and attention != "gqa":
        raise BadArgumentError(f"attention 'gqa' cannot be used for this model: {why}")
    if options.attention != "auto":
        attention = options.attention
    return GraphPlan(dtype=options.dtype, attention=attention)


def _write_graph(ckpt: Checkpoint, plan: GraphPlan, folder: Path, progress: Progress, quant) -> dict | None:
    """Writes model.onnx(.data); returns the quantization record (None for a float graph)."""
    cfg = ckpt.config
    inv_freq = cfg.rope.inv_freq(cfg.head_dim)
    if ckpt.has("rope_freqs"):  # Llama 3.1 GGUFs carry the llama3 scaling as per-frequency divisors
        inv_freq = inv_freq / ckpt.get("rope_freqs").astype(np.float64)
    total = cfg.num_layers
    progress(0, total, "build:layers")
    with open(folder / io.GRAPH_DATA_NAME, "wb") as data:
        g = GraphWriter(data, io.GRAPH_DATA_NAME)
        proj = None
        if quant is not None:
            from .quantized import QuantProjections

            proj = QuantProjections(quant, plan.np_dtype)
        model = build_decoder(g, cfg, plan, ckpt, inv_freq, proj, on_layer=lambda i: progress(i + 1, total, "build:layers"))
        progress(0, WRITE_STEPS, "write")
    onnx.save_model(model, folder / io.GRAPH_NAME)
    if proj is None:
        return None
    # streaming: no float graph runs, so nothing is calibrated whatever the options say
    record = replace(quant, calibrate=False).record(proj.errors, exact_from_source=proj.native)
    if isinstance(ckpt, GGUFCheckpoint):  # which of the file's own blocks were carried exactly, which refit
        record["tensors"] = proj.tensors
    return record


def _manifest(ckpt: Checkpoint, plan: GraphPlan, tok: TokenizerFiles, source: Path, quant: dict | None) -> Manifest:
    cfg = ckpt.config
    return Manifest(
        architecture=cfg.architecture,
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_heads=cfg.num_heads,
        num_kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        context_length=cfg.context_length,
        dtype=plan.dtype,
        weights=f"int{quant['bits']}" if quant else plan.dtype,
        quantization=quant,
        attention=plan.attention,
        kv_buffer=(KVLayout.SHARED if plan.attention == "gqa" else KVLayout.CONCAT).value,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=list(tok.eos_token_ids),
        add_bos_token=tok.add_bos_token,
        source={"path": source.name, "format": "gguf" if source.is_file() else "hf", "sha256": ckpt.hashes()},
        tool={"name": "edgellama", "version": edgellama.__version__, "onnx": onnx.__version__,
              "python": platform.python_version(), "argv": sys.argv[1:]},
    )
