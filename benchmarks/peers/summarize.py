#!/usr/bin/env python3
"""Print a markdown summary of /work/peers/results.json (export_peers.py + decode_peer.py).

    python summarize.py [/work/peers/results.json]
"""
import json
import sys


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else "/work/peers/results.json"
    with open(path) as f:
        doc = json.load(f)

    exp = doc.get("export", {})
    if exp:
        print("| export | wall s | peak RSS MB | output MB |")
        print("|---|---|---|---|")
        for name, r in exp.items():
            print(f"| {name} | {r['wall_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['out_mb']:.0f} |")
        print()

    dec = doc.get("decode", {})
    if dec:
        print("| system | decode tok/s | incl. prefill tok/s | prefill-512 tok/s "
              "| cold TTFT s | load s | cold peak RSS MB | max foreign CPUs | tokenizer ok | text |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for name, r in dec.items():
            cs = r.get("cold_start", {})
            fc = r["runs"].get("foreign_cpus", {})
            fmax = max([x for v in fc.values() for x in v]
                       + [x.get("foreign_cpus", 0) for x in cs.get("runs", [])] or [0])
            text = r["text"][:60].replace("|", "\\|").replace("\n", " ")
            print(f"| {name} | {r['decode_tok_s']:.1f} | {r['e2e_tok_s']:.1f} "
                  f"| {r['prefill_512_tok_s']:.0f} | {cs.get('ttft_cold_s', float('nan')):.3f} "
                  f"| {cs.get('load_s', float('nan')):.3f} | {cs.get('peak_rss_mb', float('nan')):.0f} "
                  f"| {fmax:.2f} | {r['tokenizer_check']['matches_prompt_ids']} | {text!r} |")
        firsts = {n: r["first32_ids"] for n, r in dec.items()}
        ref_name = "genai-fp32" if "genai-fp32" in firsts else next(iter(firsts))
        ref = firsts[ref_name]
        print()
        for n, ids in firsts.items():
            agree = next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ids))
            print(f"- {n}: first 32 ids agree with {ref_name} for {agree} tokens")


if __name__ == "__main__":
    main()
