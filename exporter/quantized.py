"""Block-quantized projections for `edgellama export --bits`: the float graph is never written.

Each weight is read, quantized (or taken exactly from the GGUF's own blocks when they map
to MatMulNBits' form and fit in the requested bits) and written before the next one.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from edgellama.buildkit.quant_nodes import QuantWeight, gather_block_quantized, matmul_nbits, write_weight
from edgellama.buildkit.quant_options import QuantOptions
from edgellama.buildkit.schemes import BlockQuant, concat_rows, quantize
from edgellama.runtime import contract as io

from .graph import lm_head


class QuantProjections:
    """Same interface as graph.FloatProjections."""

    def __init__(self, options: QuantOptions, dtype: np.dtype):
        self.opt, self.dtype = options, dtype
        self.sums: dict = {}
        self.errors: list[float] = []
        self.native = 0  # weights imported exactly from source blocks
        self.tensors: dict[str, dict] = {}  # source tensor name -> its type, how it was carried, its error
        self._table: QuantWeight | None = None  # the embedding table as written, for a tied lm_head

    def _weight(self, w, key: str, layer: int | None, bits: int) -> BlockQuant:
        """The source's own blocks when they fit in `bits` (carried exactly), else a fit of the
        float values (refit: a GGUF type wider than `bits`, or one with no exact block form)."""
        native = w.block_quant(key, layer)
        name, source_type = w.source_tensor(key, layer)
        if native is not None and native.bits <= bits:
            # Kept at its own bits: a Q4_K projection in an int8 export reads half the bytes of
            # its widened copy, with the same values (concat_rows widens only the parts of a
            # fused projection whose types differ).
            self.native += 1
            self.errors.append(0.0)
            self.tensors[name] = dict(type=source_type, carried=f"exact int{native.bits}", bits=native.bits, error=0.0)
            return native
        block, scheme = self.opt.block_for(table=layer is None), self.opt.scheme_for(bits)
        # A vocabulary table is read and fitted a few thousand rows at a time: at Llama 3.2's
        # 128k x 2048 its float32 copy alone would be 1 GB (every fit works row by row).
        chunks = w.row_chunks(key) if layer is None else [w.get(key, layer)]
        parts, err2, norm2 = [], 0.0, 0.0
        for mat in chunks:
            part = quantize(np.asarray(mat, np.float32), bits, block, scheme)
            part = part.with_half_scales() if self.dtype == np.float32 else part  # 2-byte scales (buildkit.quant_nodes)
            err2 += float(np.square(part.dequantize() - mat).sum())
            norm2 += float(np.square(mat, dtype=np.float64).sum())
            parts.append(part)
        bq = parts[0] if len(parts) == 1 else concat_rows(parts)
        self.errors.append((err2 / max(norm2, 1e-30)) ** 0.5)
        self.tensors[name] = dict(type=source_type, carried="refit", bits=bits, error=round(self.errors[-1], 6))
        return bq

    def linear(self, g, x: str, name: str, w, keys: Sequence[str], layer: int) -> str:
        bq = concat_rows([self._weight(w, k, layer, self.opt.bits) for k in keys])
        return matmul_nbits(g, x, bq, name, self.dtype, self.opt.accuracy_level, block_sums=self.sums)

    def embedding(self, g, w) -> str:
        bits = self.opt.table_bits("embeddings")
        if bits is None:
            table = g.weight_chunks("embed.weight", (np.asarray(c, self.dtype) for c in w.row_chunks("embed")))
            return g.op("Gather", [table, io.INPUT_IDS], axis=0)
        self._table = write_weight(g, self._weight(w, "embed", None, bits), "embed", self.dtype)
        return gather_block_quantized(g, self._table, io.INPUT_IDS, "embed", self.dtype)

    def lm_head(self, g, h: str, w, cfg) -> str:
        bits = self.opt.table_bits("lm_head")
        key = "embed" if cfg.tie_embeddings or not w.has("lm_head") else "lm_head"
        if bits is None:
            table = g.weight_chunks(f"{key}.weight", (np.asarray(c, self.dtype) for c in w.row_chunks(key)))
            return lm_head(g, h, table, cfg.hidden_size, cfg.vocab_size, self.dtype)
        # a tied table is stored once: at the bits asked for, or carried exactly at fewer
        exact = self.tensors.get(w.source_tensor("embed", None)[0], {}).get("carried", "").startswith("exact")
        same = key == "embed" and self._table is not None and (self._table.bq.bits == bits
                                                               or (exact and self._table.bq.bits < bits))
        table = self._table if same else self._weight(w, key, None, bits)  # a tied table: stored once
        return matmul_nbits(g, h, table, "lm_head", self.dtype, self.opt.accuracy_level, block_sums=self.sums)
