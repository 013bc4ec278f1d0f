#!/usr/bin/env python3
"""edgellama's runtime against onnxruntime-genai's own loop, on the same ONNX graph.

The machine's speed drifts by 10-20 % over tens of seconds (shared host), so one run of
each side is not a comparison. This alternates the two, several rounds, each round a
fresh process per side (decode_peer.py, warm-up then --runs greedy generations of 128
tokens), and reports the median decode tok/s of each side and the median of the
per-round ratios.

    python benchmarks/same_graph.py --model /work/peers/out/genai-int4 --rounds 5

genai runs from its own venv (--genai-python), edgellama from this interpreter.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DECODE = HERE / "peers" / "decode_peer.py"


def run(python: str, system: str, model: str, runs: int, threads: int) -> dict:
    cmd = [python, str(DECODE), "--system", system, "--model", model, "--runs", str(runs),
           "--cold-runs", "0", "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True,
                         env=dict(os.environ, CPULOAD_MAX_WAIT_S="2", HF_HUB_OFFLINE="1"))
    return json.loads(out.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", required=True, help="a genai model folder (repeatable)")
    ap.add_argument("--genai-python", default="/work/peers/genai/bin/python")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    results = {}
    for model in args.model:
        rows = []
        for r in range(args.rounds):
            order = [("genai", args.genai_python), ("edgellama", sys.executable)]
            if r % 2:
                order.reverse()  # neither side always runs first
            got = {system: run(py, system, model, args.runs, args.threads) for system, py in order}
            if got["genai"]["first32_ids"] != got["edgellama"]["first32_ids"]:
                raise SystemExit(f"{model}: the two loops generated different tokens")
            rows.append({s: got[s]["decode_tok_s"] for s in got})
            print(f"{Path(model).name} round {r + 1}: genai {rows[-1]['genai']:.1f} tok/s, "
                  f"edgellama {rows[-1]['edgellama']:.1f} tok/s, ratio {rows[-1]['edgellama'] / rows[-1]['genai']:.3f}",
                  flush=True)
        summary = {
            "genai_tok_s": statistics.median(r["genai"] for r in rows),
            "edgellama_tok_s": statistics.median(r["edgellama"] for r in rows),
            "ratio_median": statistics.median(r["edgellama"] / r["genai"] for r in rows),
            "rounds": rows,
        }
        results[Path(model).name] = summary
        print(f"{Path(model).name}: median genai {summary['genai_tok_s']:.1f}, edgellama "
              f"{summary['edgellama_tok_s']:.1f} tok/s; median ratio edgellama/genai {summary['ratio_median']:.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
