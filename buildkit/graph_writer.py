"""An ONNX graph under construction: nodes, and weights streamed to one external data file.

Used by the exporter (the decoder graph), quantize (the rewritten graph) and the optimum
path (re-saving a traced graph's weights); the graph's blocks live with their builders.
"""

from __future__ import annotations

import itertools
from typing import BinaryIO, Iterable, Sequence

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS = "com.microsoft"  # onnxruntime's contrib-op domain
OPSET = 17
# Weights of 1 MiB and more start on a 64 KiB boundary (a multiple of every page size and of
# Windows' allocation granularity), so a memory map of them shares no page with another weight;
# smaller ones (a small model's projections, scales, norms: hundreds per model, and MatMulNBits
# prepacks them into memory of its own anyway) are packed on 64-byte boundaries — 64 KiB
# alignment for all of them padded SmolLM2's int4 folder by 14 MB.
_ALIGN = 64 * 1024
_SMALL = 1024 * 1024
_SMALL_ALIGN = 64


def stored_size(nbytes: int) -> int:
    """The most a weight of `nbytes` takes in the external data file, its alignment included."""
    return nbytes + (_ALIGN if nbytes >= _SMALL else _SMALL_ALIGN)


class GraphWriter:
    """Collects nodes; appends each weight to the external data file as it arrives."""

    def __init__(self, data: BinaryIO, data_name: str, prefix: str = ""):
        self.data, self.data_name, self.prefix = data, data_name, prefix
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{self.prefix}{hint}_{self._count}"

    def weight(self, name: str, arr: np.ndarray) -> str:
        """Stream one weight to external data; only its location stays in memory."""
        return self.weight_chunks(name, [arr])

    def weight_chunks(self, name: str, chunks: Iterable[np.ndarray]) -> str:
        """One weight written as consecutive row blocks (a big table never whole in memory)."""
        chunks = iter(chunks)
        head = [np.ascontiguousarray(c) for c in itertools.islice(chunks, 2)]
        big = len(head) > 1 or sum(c.nbytes for c in head) >= _SMALL  # a weight in chunks is a big one
        align = _ALIGN if big else _SMALL_ALIGN
        offset = -(-self.data.tell() // align) * align
        self.data.seek(offset)
        rows, tail, dtype = 0, (), None
        for chunk in itertools.chain(head, chunks):
            chunk = np.ascontiguousarray(chunk)
            self.data.write(memoryview(chunk).cast("B"))
            rows, tail, dtype = rows + (chunk.shape[0] if chunk.ndim else 1), chunk.shape[1:], chunk.dtype
        shape = (rows, *tail) if tail or rows > 1 else (rows,)
        t = TensorProto(name=name, data_type=helper.np_dtype_to_tensor_dtype(dtype), dims=shape)
        t.data_location = TensorProto.EXTERNAL
        length = self.data.tell() - offset
        for k, v in (("location", self.data_name), ("offset", str(offset)), ("length", str(length))):
            t.external_data.add(key=k, value=v)
        self.initializers.append(t)
        return name

    def const(self, value, hint: str = "const") -> str:
        name = self.fresh(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def op(self, op_type: str, inputs: Sequence[str], n_out: int = 1, domain: str = "",
           outputs: Sequence[str] | None = None, **attrs) -> str | list[str]:
        name = self.fresh(op_type)
        outs = list(outputs) if outputs is not None else [f"{name}/out{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain or None, **attrs))
        return outs[0] if len(outs) == 1 else outs
