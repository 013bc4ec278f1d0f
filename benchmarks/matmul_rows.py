#!/usr/bin/env python3
"""What a forward over several tokens costs per weight format: onnxruntime's CPU matmul kernels
timed alone on one projection, for 1, 2, 4 and 8 rows (tokens).

    python benchmarks/matmul_rows.py [--k 1536 --n 576] [--threads 2] [--calls 100]

Formats (random weights; the kernels do not care about the values):
    nbits4-bBLOCK   MatMulNBits, 4 bits, accuracy level 4 (int8 activations): edgellama's int4
    nbits8-b64      MatMulNBits, 8 bits, accuracy level 4
    dqmm-int8       DynamicQuantizeMatMul: int8 weights with a scale per column, MLAS' int8 GEMM
    fp32            MatMul, float weights

Each cell is the median over 5 batches of --calls calls (the weights stay in cache: this is
the kernels' compute, not memory bandwidth), with its ratio to the single-row call, and the
multiply-accumulates per second at 8 rows. Speculative verification feeds up to 9 rows; a
format whose 8-row call costs many single-row calls makes drafts dear (README: Speculative
decoding).
"""
from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROWS = (1, 2, 4, 8)


def session(node, inits, k, n, threads):
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, "s", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def nbits(rng, k, n, bits, block, threads):
    blocks = -(-k // block)
    q = rng.integers(0, 256, (n, blocks, block * bits // 8), dtype=np.uint8)
    scales = (rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32)
    node = helper.make_node("MatMulNBits", ["X", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=4)
    return session(node, [numpy_helper.from_array(q, "B"), numpy_helper.from_array(scales, "S")], k, n, threads)


def dqmm(rng, k, n, threads):
    w = rng.integers(-127, 128, (k, n), dtype=np.int8)
    node = helper.make_node("DynamicQuantizeMatMul", ["X", "W", "S"], ["Y"], domain="com.microsoft")
    return session(node, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(np.full(n, 0.01, np.float32), "S")],
                   k, n, threads)


def fp32(rng, k, n, threads):
    w = rng.standard_normal((k, n)).astype(np.float32)
    return session(helper.make_node("MatMul", ["X", "W"], ["Y"]), [numpy_helper.from_array(w, "W")], k, n, threads)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=int, default=1536, help="input width (default: SmolLM2's down projection)")
    ap.add_argument("--n", type=int, default=576, help="output width")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--calls", type=int, default=100)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    formats = {f"nbits4-b{b}": (lambda b=b: nbits(rng, a.k, a.n, 4, b, a.threads)) for b in (32, 64, 128)}
    formats["nbits8-b64"] = lambda: nbits(rng, a.k, a.n, 8, 64, a.threads)
    formats["dqmm-int8"] = lambda: dqmm(rng, a.k, a.n, a.threads)
    formats["fp32"] = lambda: fp32(rng, a.k, a.n, a.threads)
    print(f"K={a.k} N={a.n}, {a.threads} threads, onnxruntime {ort.__version__}: microseconds per call (x the 1-row call)")
    print(f"{'format':12s} " + " ".join(f"{f'{m} rows':>16s}" for m in ROWS) + f" {'GMAC/s at 8':>12s}")
    for name, make in formats.items():
        sess, cells = make(), []
        for m in ROWS:
            x = rng.standard_normal((1, m, a.k)).astype(np.float32)
            for _ in range(20):
                sess.run(None, {"X": x})
            batches = []
            for _ in range(5):
                t = time.perf_counter()
                for _ in range(a.calls):
                    sess.run(None, {"X": x})
                batches.append((time.perf_counter() - t) / a.calls * 1e6)
            cells.append(statistics.median(batches))
        rate = ROWS[-1] * a.k * a.n / cells[-1] / 1e3
        print(f"{name:12s} " + " ".join(f"{c:8.0f} ({c / cells[0]:4.2f})" for c in cells) + f" {rate:12.0f}", flush=True)


if __name__ == "__main__":
    main()
