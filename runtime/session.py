"""ONNX Runtime sessions: providers, threads, and what the graph's I/O says about its KV cache."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from . import contract as io
from .errors import BadArgumentError, BadModelFileError

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}


def make_session(graph: Path | bytes, provider: str = "cpu", threads: int | None = None, optimize: bool = True,
                 config: dict[str, str] | None = None, external_data_folder: Path | None = None,
                 arena: bool = True) -> ort.InferenceSession:
    """A session on a graph file, or on serialized graph bytes whose external data lives in
    `external_data_folder`. optimize=False for graphs optimized offline (`edgellama compile`);
    config: extra session config entries; arena=False: no CPU memory arena (allocations go
    back as tensors die instead of pooling at the peak's rounded-up size)."""
    if provider not in PROVIDERS:
        raise BadArgumentError(f"provider {provider!r} is not supported; choose one of {', '.join(PROVIDERS)}")
    if PROVIDERS[provider] not in ort.get_available_providers():
        raise BadArgumentError(
            f"provider {provider!r} is not available in this onnxruntime build "
            f"(available: {', '.join(ort.get_available_providers())}); for CUDA install onnxruntime-gpu"
        )
    if threads is not None and threads < 1:
        raise BadArgumentError(f"threads is {threads}; give a number >= 1 (or leave it out for the physical cores)")
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = threads or default_threads()
    opts.enable_cpu_mem_arena = arena
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if not optimize:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    if external_data_folder is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      str(external_data_folder))
    providers = [PROVIDERS[provider]] + (["CPUExecutionProvider"] if provider != "cpu" else [])
    try:
        return ort.InferenceSession(graph if isinstance(graph, bytes) else str(graph), opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad graphs
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        where = external_data_folder if isinstance(graph, bytes) else graph
        raise BadModelFileError(f"{where}: onnxruntime cannot load this graph ({first}); re-export the model") from None


def default_threads() -> int:
    """onnxruntime's intra-op threads when none are asked for: the physical cores, guessed as
    half the logical ones on machines large enough to have SMT."""
    n = os.cpu_count() or 1
    return max(1, n // 2) if n >= 8 else n


@dataclass(frozen=True)
class GraphIO:
    """The KV-cache layout as the graph itself declares it."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    kv_dtype: np.dtype
    vocab_size: int | None
    has_position_ids: bool
    logits_to_keep: tuple[str, list[int]] | None  # (input name, shape of its value), if the graph has one

    @property
    def has_logits_to_keep(self) -> bool:
        return self.logits_to_keep is not None

    def keep(self, k: int) -> dict[str, np.ndarray]:
        """The feed asking for the last k positions' logits (0: every position); {} if the
        graph always returns every position."""
        if self.logits_to_keep is None:
            return {}
        name, shape = self.logits_to_keep
        return {name: np.full(shape, k, np.int64)}

    @classmethod
    def from_session(cls, sess: ort.InferenceSession, where: str, kv_heads: int | None = None,
                     head_dim: int | None = None) -> "GraphIO":
        """kv_heads / head_dim fill in where the graph leaves those axes symbolic."""
        inputs = {i.name: i for i in sess.get_inputs() + sess.get_overridable_initializers()}
        for name in (io.INPUT_IDS, io.ATTENTION_MASK, io.past_key(0)):
            if name not in inputs:
                raise BadModelFileError(f"{where}: graph has no input {name!r}; it is not a decoder with a KV cache")
        layers = 0
        while io.past_key(layers) in inputs:
            layers += 1
        past = inputs[io.past_key(0)]
        shape = list(past.shape)  # (batch, kv_heads, past_seq, head_dim)
        if len(shape) == 4:
            shape[1] = shape[1] if isinstance(shape[1], int) else kv_heads
            shape[3] = shape[3] if isinstance(shape[3], int) else head_dim
        if len(shape) != 4 or not isinstance(shape[1], int) or not isinstance(shape[3], int):
            raise BadModelFileError(f"{where}: {past.name} has shape {shape}; expected (batch, kv_heads, seq, head_dim)")
        if past.type not in _ORT_TYPES:
            raise BadModelFileError(f"{where}: {past.name} has type {past.type}; expected float or float16")
        logits = {o.name: o for o in sess.get_outputs()}.get(io.LOGITS)
        if logits is None:
            raise BadModelFileError(f"{where}: graph has no output {io.LOGITS!r}")
        vocab = logits.shape[-1] if isinstance(logits.shape[-1], int) else None
        return cls(layers, shape[1], shape[3], np.dtype(_ORT_TYPES[past.type]), vocab,
                   io.POSITION_IDS in inputs, _logits_to_keep(inputs))


def _logits_to_keep(inputs: dict) -> tuple[str, list[int]] | None:
    if io.LOGITS_TO_KEEP in inputs:
        return io.LOGITS_TO_KEEP, [1]
    if io.LEGACY_LOGITS_TO_KEEP in inputs:
        return io.LEGACY_LOGITS_TO_KEEP, []
    return None
