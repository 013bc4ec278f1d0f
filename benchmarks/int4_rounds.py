#!/usr/bin/env python3
"""int4 decode, alternating rounds: onnxruntime-genai int4, llama.cpp Q4_1 and edgellama int4
folders, one fresh process (decode_peer.py) per system per round, medians.

The edgellama folders come from `edgellama quantize /work/compare/el-fp32 DIR/NAME`:
msezp-b32 (--method mse-zp), mse-b32 (the default) and mse-b128 (--block-size 128).

    python benchmarks/int4_rounds.py --el-dir /tmp/q --gguf .../SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from same_graph import run  # decode_peer.py in a fresh process


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--el-dir", required=True, help="folder holding msezp-b32, mse-b32, mse-b128")
    ap.add_argument("--gguf", required=True, help="the Q4_1 GGUF for llama.cpp")
    ap.add_argument("--genai-model", default="/work/peers/out/genai-int4")
    ap.add_argument("--genai-python", default="/work/peers/genai/bin/python")
    ap.add_argument("--llamacpp-python", default="/work/peers/llamacpp/bin/python")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the per-round figures here too")
    args = ap.parse_args()
    el = Path(args.el_dir)
    sides = [("genai-int4", args.genai_python, "genai", args.genai_model),
             ("llamacpp-q4_1", args.llamacpp_python, "llamacpp", args.gguf)]
    sides += [(f"el-{name}", sys.executable, "edgellama", str(el / name)) for name in ("msezp-b32", "mse-b32", "mse-b128")]
    decode = {name: [] for name, *_ in sides}
    prefill = {name: [] for name, *_ in sides}
    for r in range(args.rounds):
        for name, python, system, model in (sides if r % 2 == 0 else sides[::-1]):
            d = run(python, system, model, args.runs, args.threads)
            decode[name].append(d["decode_tok_s"])
            prefill[name].append(d["prefill_512_tok_s"])
            print(f"round {r + 1} {name}: decode {d['decode_tok_s']:.1f} tok/s, prefill-512 "
                  f"{d['prefill_512_tok_s']:.1f} tok/s", flush=True)
    for name in decode:
        print(f"{name}: median decode {statistics.median(decode[name]):.1f} tok/s, "
              f"prefill-512 {statistics.median(prefill[name]):.1f} tok/s")
    if args.json:
        Path(args.json).write_text(json.dumps({"decode_tok_s": decode, "prefill_512_tok_s": prefill}, indent=2) + "\n")


if __name__ == "__main__":
    main()
