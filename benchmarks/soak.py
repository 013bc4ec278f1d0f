"""Soak test: resident memory over a generation as long as the context allows, over load /
unload cycles, and one model shared by threads.

    HF_HUB_OFFLINE=1 python benchmarks/soak.py MODEL_DIR [--tokens 4096] [--cycles 50] [--json out.json]

1. --cycles rounds of load -> generate 4 tokens -> drop: RSS after each; growth per cycle is
   the least-squares slope after the first 10.
2. One sampled generation (temperature 0.8, seed 0, EOS ignored) of --tokens tokens; RSS every
   --every tokens. The KV cache is preallocated but its pages are touched only as tokens arrive,
   so RSS grows by the KV bytes written; "rss - kv" is what must stay flat after warm-up.
3. --threads threads share the loaded model: 2 x --threads generations (greedy and seeded
   sampling) started together must give the sequential texts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edgellama.runtime.model import Model
from edgellama.tools.soak import kv_bytes_per_token, load_cycles, long_generation, rss_bytes, run_threads, slope

MB = 2**20
PARTS = ("cycles", "generation", "threads")
PROMPT = "Write a long story about a lighthouse keeper who finds a map in a bottle."


def soak_generation(model: Model, tokens: int, every: int, warmup: int) -> dict:
    samples, _ = long_generation(model, PROMPT, tokens, every=every, temperature=0.8, top_p=0.95, seed=0)
    print(f"{'tokens':>7} {'s':>7} {'tok/s':>6} {'RSS MB':>8} {'KV MB':>7} {'RSS-KV MB':>10}")
    for s in samples:
        rate = s.tokens / s.seconds if s.seconds else 0.0
        print(f"{s.tokens:7d} {s.seconds:7.1f} {rate:6.1f} {s.rss / MB:8.1f} {s.kv_bytes / MB:7.1f} "
              f"{(s.rss - s.kv_bytes) / MB:10.1f}")
    warm = next(s for s in samples if s.tokens >= warmup)
    end = samples[-1]
    rest = [s.rss - s.kv_bytes for s in samples if s.tokens >= warmup]
    return {
        "tokens": end.tokens, "seconds": round(end.seconds, 1), "warmup_tokens": warm.tokens,
        "kv_bytes_per_token": kv_bytes_per_token(model),
        "rss_mb_at_warmup": round(warm.rss / MB, 1), "rss_mb_at_end": round(end.rss / MB, 1),
        "kv_mb_written_after_warmup": round((end.kv_bytes - warm.kv_bytes) / MB, 1),
        "rss_minus_kv_mb_at_warmup": round(rest[0] / MB, 1), "rss_minus_kv_mb_at_end": round(rest[-1] / MB, 1),
        "rss_minus_kv_mb_max_after_warmup": round(max(rest) / MB, 1),
        "samples": [[s.tokens, round(s.seconds, 2), s.rss, s.kv_bytes] for s in samples],
    }


def soak_threads(model: Model, threads: int, tokens: int) -> dict:
    prompts = [PROMPT, "The capital of France is", "def fibonacci(n):", "Once upon a time, in a city by the sea,"]
    prompts = (prompts * threads)[:threads]
    jobs = [dict(prompt=p, max_new_tokens=tokens) for p in prompts]
    jobs += [dict(prompt=p, max_new_tokens=tokens, temperature=0.9, top_p=0.95, seed=i) for i, p in enumerate(prompts)]
    sequential = [model.generate_text(**dict(j)) for j in jobs]
    together = run_threads(model, jobs, threads)
    same = [a == b for a, b in zip(sequential, together)]
    print(f"{threads} threads, {len(jobs)} generations of {tokens} tokens: {sum(same)}/{len(same)} equal the sequential text")
    return {"threads": threads, "generations": len(jobs), "tokens": tokens, "equal": all(same)}


def soak_cycles(folder: Path, cycles: int, threads: int | None) -> dict:
    rss = load_cycles(folder, cycles, threads=threads)
    early, late = statistics.median(rss[10:20]), statistics.median(rss[-10:])
    per_cycle = (late - early) / max(1, (cycles - 10) - 10)  # between the middles of those two windows
    print(f"{cycles} load/unload cycles: RSS after 1: {rss[0] / MB:.1f} MB; median of cycles 11-20: {early / MB:.1f} MB, "
          f"of the last 10: {late / MB:.1f} MB; growth {per_cycle / 1024:.1f} KB a cycle "
          f"(least-squares slope after 10: {slope(rss[10:]) / 1024:.1f} KB)")
    return {"cycles": cycles, "rss_mb": [round(r / MB, 2) for r in rss], "growth_kb_per_cycle": round(per_cycle / 1024, 2),
            "slope_kb_per_cycle": round(slope(rss[10:]) / 1024, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--tokens", type=int, default=4096, help="new tokens (fewer if the context ends first)")
    ap.add_argument("--every", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=256, help="tokens before RSS should be flat")
    ap.add_argument("--cycles", type=int, default=50, help="at least 30")
    ap.add_argument("--threads", type=int, default=4, help="threads sharing one model")
    ap.add_argument("--ort-threads", type=int, default=None, help="onnxruntime intra-op threads")
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if rss_bytes() is None:
        print("RSS is read from /proc: Linux only", file=sys.stderr)
        return 1
    result = {"model": str(args.model_dir), "rss_mb_at_start": round(rss_bytes() / MB, 1)}
    if "cycles" in args.parts:  # first: its RSS figures are not inflated by a long generation's
        result["load_unload"] = soak_cycles(args.model_dir, args.cycles, args.ort_threads)
    if "generation" in args.parts or "threads" in args.parts:
        model = Model.load(args.model_dir, threads=args.ort_threads)
        print(f"RSS after load {rss_bytes() / MB:.1f} MB")
    if "generation" in args.parts:
        result["generation"] = soak_generation(model, args.tokens, args.every, args.warmup)
    if "threads" in args.parts:
        result["threads"] = soak_threads(model, args.threads, 48)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0 if result.get("threads", {"equal": True})["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
