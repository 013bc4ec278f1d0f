#!/usr/bin/env python3
"""Perplexity of a GGUF under llama.cpp on given token ids, windowed like `edgellama eval`.

Run with the llama.cpp venv's python (llama-cpp-python):

    $PEERS/llamacpp/bin/python benchmarks/peers/llamacpp_ppl.py GGUF IDS.json [--window 512]

IDS.json holds {"ids": [...]} — the text's token ids from edgellama's tokenizer
(``Model.load(dir).encode(text)``, no BOS), so llama.cpp is scored on exactly the ids the
ONNX models see.  Windows of --window tokens start at 0, W, 2W, ... (non-overlapping);
each is fed fresh (KV cache cleared) with logits_all=True, and tokens 1..n-1 of the window
are scored from the logits at positions 0..n-2.  Perplexity = exp(mean NLL) over every
scored token.  Prints one JSON object.
"""
import argparse
import json
import math
import time

import numpy as np
from llama_cpp import Llama


def log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf")
    ap.add_argument("ids_json")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    with open(args.ids_json) as f:
        ids = json.load(f)["ids"]
    w = args.window
    llm = Llama(model_path=args.gguf, n_ctx=w, n_batch=w, n_ubatch=w, logits_all=True,
                n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    nll, count, n_windows = 0.0, 0, 0
    t0 = time.perf_counter()
    for start in range(0, len(ids) - 1, w):
        chunk = ids[start:start + w]
        if len(chunk) < 2:
            break
        llm.reset()                     # n_tokens = 0: eval() clears the KV cache from there
        llm.eval(chunk)
        logits = np.asarray(llm.scores[:len(chunk)], dtype=np.float32)
        logp = log_softmax(logits[:-1])
        targets = np.asarray(chunk[1:])
        nll -= float(logp[np.arange(len(targets)), targets].sum())
        count += len(targets)
        n_windows += 1
    print(json.dumps({"perplexity": math.exp(nll / count), "tokens": count, "windows": n_windows,
                      "window": w, "seconds": round(time.perf_counter() - t0, 2)}))


if __name__ == "__main__":
    main()
