#!/usr/bin/env python3
"""Perplexity of an onnxruntime-genai graph whose sliding-window GroupQueryAttention wants a KV
buffer of at least one window (Gemma 3: "KV cache capacity (0) must be at least
local_window_size (512)"), scored by edgellama's evaluate() as `edgellama eval` scores any
folder, but with each window's empty past given that capacity (zeros; nothing of it is read,
the attention mask covering only the window):

    python benchmarks/peers/genai_graph_ppl.py FOLDER --text GPL-3.txt [--capacity 512]

Prints one JSON object (perplexity, tokens).
"""
import argparse
import functools
import json

from edgellama.runtime.model import Model
from edgellama.tools import evaluate as ev


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder")
    ap.add_argument("--text", required=True)
    ap.add_argument("--capacity", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    ev.full_logits = functools.partial(ev.full_logits, past_capacity=args.capacity)
    model = Model.load(args.folder, threads=args.threads)
    with open(args.text, encoding="utf-8") as f:
        result = ev.evaluate(model, f.read())
    print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens}))


if __name__ == "__main__":
    main()
