#!/usr/bin/env python3
"""Speculative decoding: edgellama's `ngram` and `draft` against its plain greedy decode and the peers'.

    HF_HUB_OFFLINE=1 python benchmarks/speculative.py --gguf GGUF [--rounds 2] [--prepare]

Prompts (--prompts, default benchmarks/prompts/speculative.json): a *grounded* set (the
answer can copy from a given passage, function, JSON list or table) and an *open* set
(stories, explanations). edgellama's Model.render_chat applies the chat template once; the
same token ids go to every system (genai gets ids, not text: its tokenizer mis-reads some
exported tokenizer.json files). Greedy, at most --new-tokens (256) new tokens, stopping at
EOS, 2 threads.

Systems and modes (one fresh process each per round, peers/speculative_peer.py, under the
python that has the system; the order of systems alternates between rounds; inside a process
every prompt runs all its modes back to back, so each speed-up is a ratio measured minutes
apart in one process):

    el-fp32      edgellama fp32 export of the GGUF: plain, ngram, draft (the int4 export drafts)
    el-int4      edgellama `quantize el-fp32` (its default preset, balanced; folder el-int4q):
                 plain, ngram
    genai-int4   onnxruntime-genai builder -p int4 on the float copy: plain, ngram
                 (set_speculative_options(ngram_size, max_draft_tokens))
    genai-fp32   genai builder -p fp32: plain, draft (genai-int4 as genai_config model.draft)
    llamacpp     llama-cpp-python on the Q4_1 GGUF: plain, lookup (LlamaPromptLookupDecoding)
    transformers float copy, PyTorch eager: plain, lookup (prompt_lookup_num_tokens)

SmolLM2-135M is the smallest model of its tokenizer at hand, so `draft` measures the
mechanism: the int4 graph of the same model drafting for the fp32 graph.

Per system and set: decode tok/s (prefill excluded: first new token to last) median over
prompts; speed-up over the system's own plain decode (per prompt: median over rounds of the
per-process ratio; then median over prompts); tokens per forward and acceptance where the
system counts them; greedy identity with plain (all tokens equal) and token agreement
(common prefix / plain length). Targets are printed beside the figures.

--prepare builds any missing model folder (float copy via peers/float_copy_tf5.py, the
edgellama exports, the genai builds). Paths: benchmarks/layout.py (--work, --gguf, ...).
Writes SPECULATIVE.md and speculative.json to --out (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import host
import layout

PEER = Path(__file__).resolve().parent / "peers" / "speculative_peer.py"
FLOAT_COPY = Path(__file__).resolve().parent / "peers" / "float_copy_tf5.py"
PROMPTS = Path(__file__).resolve().parent / "prompts" / "speculative.json"

TARGETS = {
    "grounded_speedup": 1.8,         # edgellama ngram decode / plain, median over grounded prompts
    "vs_genai_ngram_abs": 1.3,       # edgellama ngram tok/s / genai ngram tok/s (int4, grounded)
    "open_speedup": 0.95,            # edgellama ngram / plain on the open set
}


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def systems(a, lay) -> dict:
    """label -> (python, peer args)."""
    ex = a.exports
    return {
        "el-fp32": (a.python, ["--system", "edgellama", "--model", str(ex / "el-fp32"),
                               "--draft-model", str(ex / "el-int4q"), "--modes", "plain,ngram,draft"]),
        "el-int4": (a.python, ["--system", "edgellama", "--model", str(ex / "el-int4q"), "--modes", "plain,ngram"]),
        "genai-int4": (a.genai_python, ["--system", "genai", "--model", str(ex / "genai-int4"),
                                        "--modes", "plain,ngram"]),
        "genai-fp32": (a.genai_python, ["--system", "genai", "--model", str(ex / "genai-fp32"),
                                        "--draft-model", str(ex / "genai-int4"), "--modes", "plain,draft"]),
        "llamacpp": (a.llamacpp_python, ["--system", "llamacpp", "--model", str(lay.gguf),
                                         "--modes", "plain,lookup"]),
        "transformers": (a.transformers_python, ["--system", "transformers", "--model", str(lay.float_copy),
                                                 "--modes", "plain,lookup"]),
    }


def prepare(a, lay) -> None:
    """Build the model folders that are missing."""
    ex = a.exports
    ex.mkdir(parents=True, exist_ok=True)
    el = [a.edgellama or str(Path(a.python).parent / "edgellama")]
    builder = [a.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(lay.float_copy), "-e", "cpu",
               "-c", str(ex / "genai_cache")]
    steps = [
        (lay.float_copy, [a.python, str(FLOAT_COPY), "--gguf-dir", str(lay.gguf.parent), "--gguf-file", lay.gguf.name,
                          "--out", str(lay.float_copy)]),
        (ex / "el-fp32", [*el, "export", str(lay.gguf), str(ex / "el-fp32")]),
        (ex / "el-int4q", [*el, "quantize", str(ex / "el-fp32"), str(ex / "el-int4q")]),
        (ex / "genai-int4", [*builder, "-o", str(ex / "genai-int4"), "-p", "int4"]),
        (ex / "genai-fp32", [*builder, "-o", str(ex / "genai-fp32"), "-p", "fp32"]),
    ]
    for folder, cmd in steps:
        if folder.exists():
            continue
        log(f"building {folder}: {shlex.join(cmd)}")
        subprocess.run(cmd, check=True, env=env())


def render(a, lay) -> list[dict]:
    from edgellama import Model
    m = Model.load(str(a.exports / "el-fp32"), threads=a.threads)
    doc = json.loads(a.prompts.read_text())
    out = []
    for s in ("grounded", "open"):
        ps = [p for p in doc["prompts"] if p["set"] == s][: a.limit.get(s)]
        out += [{"id": p["id"], "set": p["set"], "task": p.get("task"),
                 "ids": m.render_chat([{"role": "user", "content": p["text"]}])} for p in ps]
    return out


def run_peer(label, python, args, ids_file, a) -> dict:
    cmd = [python, str(PEER), *args, "--ids", ids_file, "--new-tokens", str(a.new_tokens),
           "--draft-tokens", str(a.draft_tokens), "--ngram", str(a.ngram), "--threads", str(a.threads)]
    t = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=dict(env(), CPULOAD_MAX_WAIT_S=str(a.max_wait)))
    if p.returncode != 0:
        log(f"{label} failed:\n{p.stderr[-2000:]}")
        return {"error": p.stderr[-2000:], "command": shlex.join(cmd)}
    r = json.loads(p.stdout)
    r["wall_s"] = round(time.perf_counter() - t, 1)
    r["command"] = shlex.join(cmd)
    log(f"{label}: done in {r['wall_s']} s")
    return r


def _compact_json(doc) -> str:
    """Indented JSON with every list of numbers (token ids, times) on one line: the file
    holds every token of every round, one per line would make it megabytes."""
    text = json.dumps(doc, indent=1)
    return re.sub(r"\[\s*(-?[\d.eE+-]+(?:,\s*-?[\d.eE+-]+)*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)


def med(xs):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 3) if xs else None


def agreement(a: list[int], b: list[int]) -> float:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n / max(len(a), 1)


def summarise(rounds: list[dict], labels: list[str], prompts: list[dict]) -> dict:
    """Per system, per set, per mode: medians over prompts of per-prompt medians over rounds."""
    out = {}
    for label in labels:
        runs = [r[label] for r in rounds if label in r and "error" not in r[label]]
        if not runs:
            out[label] = {"error": next((r[label]["error"] for r in rounds if label in r), "not run")}
            continue
        modes = runs[0]["modes"]
        per_set = {}
        for s in ("grounded", "open"):
            ids = [p["id"] for p in prompts if p["set"] == s]
            if not ids:
                continue
            rows = {}
            for m in modes:
                tok_s, speed, tpf, drafted, accepted, ident, agree, n, foreign = [], [], [], 0, 0, [], [], [], []
                for pid in ids:
                    got = [next(q for q in run["prompts"] if q["id"] == pid)["modes"] for run in runs]
                    tok_s.append(med([g[m]["decode_tok_s"] for g in got]))
                    speed.append(med([g[m]["decode_tok_s"] / g["plain"]["decode_tok_s"] for g in got
                                      if g[m]["decode_tok_s"] and g["plain"]["decode_tok_s"]]))
                    n.append(med([g[m]["n"] for g in got]))
                    foreign.append(max(g[m]["foreign_cpus"] for g in got))
                    ident.append(all(g[m]["tokens"] == g["plain"]["tokens"] for g in got))
                    agree.append(min(agreement(g["plain"]["tokens"], g[m]["tokens"]) for g in got))
                    for g in got:
                        st = g[m]["stats"]
                        if st and st.get("forwards"):
                            tpf.append(g[m]["n"] / (st["forwards"] + 1))  # +1: the token of the prompt's forward
                            drafted += st.get("drafted") or 0
                            accepted += st.get("accepted") or 0
                rows[m] = {"decode_tok_s": med(tok_s), "speedup": med(speed) if m != "plain" else 1.0,
                           "speedup_min": min((x for x in speed if x), default=None) if m != "plain" else None,
                           "speedup_max": max((x for x in speed if x), default=None) if m != "plain" else None,
                           "tokens_per_forward": med(tpf) if tpf else None,
                           "acceptance": round(accepted / drafted, 3) if drafted else None,
                           "identical_to_plain": f"{sum(ident)}/{len(ident)}",
                           "token_agreement": round(statistics.mean(agree), 3),
                           "new_tokens_median": med(n), "max_foreign_cpus": max(foreign),
                           "per_prompt": {pid: {"decode_tok_s": t, "speedup": sp} for pid, t, sp in zip(ids, tok_s, speed)}}
            per_set[s] = rows
        out[label] = {"sets": per_set, "versions": runs[0].get("versions"), "load_s": runs[0].get("load_s")}
    return out


def vs_genai(rounds, prompts) -> float | None:
    """el-int4 ngram tok/s / genai-int4 ngram tok/s, per grounded prompt (median over rounds), median."""
    ratios = []
    for p in (p for p in prompts if p["set"] == "grounded"):
        per = []
        for r in rounds:
            try:
                e = next(q for q in r["el-int4"]["prompts"] if q["id"] == p["id"])["modes"]["ngram"]["decode_tok_s"]
                g = next(q for q in r["genai-int4"]["prompts"] if q["id"] == p["id"])["modes"]["ngram"]["decode_tok_s"]
                per.append(e / g)
            except (KeyError, StopIteration, TypeError, ZeroDivisionError):
                pass
        if per:
            ratios.append(statistics.median(per))
    return round(statistics.median(ratios), 3) if ratios else None


NAMES = {"el-fp32": "edgellama fp32", "el-int4": "edgellama int4", "genai-int4": "onnxruntime-genai int4",
         "genai-fp32": "onnxruntime-genai fp32", "llamacpp": "llama.cpp Q4_1", "transformers": "transformers fp32"}
MODE_NAMES = {"ngram": "n-gram", "draft": "draft (int4 drafts)", "lookup": "prompt lookup"}


def fmt(x, nd=2, suffix=""):
    return "—" if x is None else f"{x:.{nd}f}{suffix}"


def report(doc: dict) -> str:
    s, summ, chk = doc["settings"], doc["summary"], doc["targets"]
    L = ["# Speculative decoding: edgellama against plain greedy and the peers", "",
         "Written by `benchmarks/speculative.py` from [speculative.json](speculative.json); "
         "`python benchmarks/speculative.py --help` gives the method. A later run replaces this file.", "",
         f"Machine: {host.describe(doc['machine'])}, {s['threads']} threads, shared with other jobs (see max foreign "
         f"CPUs). Measured {doc['measured_at']}.", "",
         f"- command: `{doc['command']}`",
         f"- {s['rounds']} round(s); prompts: {doc['n_prompts']['grounded']} grounded, {doc['n_prompts']['open']} open "
         f"({s['prompts']}); chat template applied by edgellama, the same ids fed to every system; greedy, at most "
         f"{s['new_tokens']} new tokens, stop at EOS; draft length {s['draft_tokens']}, n-gram {s['ngram']}.",
         "- decode tok/s: first new token to last (prefill excluded), median over prompts. Speed-up: the system's "
         "speculative over its own plain decode, per prompt in the same process, median over prompts (min–max).",
         "- `draft`: no smaller model of this tokenizer is at hand, so the int4 graph of the same model drafts for "
         "the fp32 graph (edgellama: its `quantize` default; genai: its int4 build as `model.draft`). This measures the "
         "mechanism, not a realistic draft/target size ratio.", "",
         "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in chk:
        L.append(f"| {t['what']} | {t['measured']} | {t['met']} |")
    for st in ("grounded", "open"):
        L += ["", f"## {st} set", "",
              "| system | mode | decode tok/s | speed-up (min–max) | tokens/forward | acceptance | identical to plain "
              "| token agreement | new tokens (median) | max foreign CPUs |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for label, v in summ.items():
            if "error" in v:
                L.append(f"| {NAMES.get(label, label)} | not measured: {v['error'].strip().splitlines()[-1][:120]} "
                         "| | | | | | | | |")
                continue
            for m, r in v["sets"].get(st, {}).items():
                sp = "1.00" if m == "plain" else f"{fmt(r['speedup'])}x ({fmt(r['speedup_min'])}–{fmt(r['speedup_max'])})"
                L.append(f"| {NAMES.get(label, label)} | {MODE_NAMES.get(m, m)} | {fmt(r['decode_tok_s'], 1)} | {sp} | "
                         f"{fmt(r['tokens_per_forward'])} | {fmt(r['acceptance'])} | "
                         f"{'—' if m == 'plain' else r['identical_to_plain']} | "
                         f"{'—' if m == 'plain' else fmt(r['token_agreement'], 3)} | {fmt(r['new_tokens_median'], 0)} "
                         f"| {fmt(r['max_foreign_cpus'])} |")
    if doc.get("not_measured"):
        L += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in doc["not_measured"].items()]
    L += ["", "Tokens/forward: new tokens / (target forwards after the prompt's + 1); edgellama and genai count "
          "forwards themselves, llama.cpp (Llama.eval calls) and transformers (model.forward calls) are counted by "
          "wrapping. Acceptance: accepted / drafted-and-verified tokens (edgellama, genai).",
          "Identical to plain: prompts whose greedy tokens equal the same system's plain ones; token agreement: "
          "mean common prefix / plain length. On int4 graphs (int8 activations) the ~1e-7 by which a "
          "forward over several tokens differs from single-token forwards now and then moves a value "
          "across an int8 rounding boundary (README: Speculative decoding), so int4 greedy text may drift."]
    return "\n".join(L) + "\n"


def targets(summ: dict, ratio_genai) -> list[dict]:
    def sp(label, st, m):
        try:
            return summ[label]["sets"][st][m]["speedup"]
        except KeyError:
            return None
    out = []
    for label in ("el-int4", "el-fp32"):
        x = sp(label, "grounded", "ngram")
        out.append({"what": f"grounded: {NAMES[label]} n-gram ≥ {TARGETS['grounded_speedup']}x plain",
                    "measured": fmt(x, 2, "x"), "met": "—" if x is None else ("yes" if x >= TARGETS["grounded_speedup"] else "no")})
    out.append({"what": f"grounded: edgellama int4 n-gram tok/s ≥ {TARGETS['vs_genai_ngram_abs']}x genai int4 n-gram",
                "measured": fmt(ratio_genai, 2, "x"),
                "met": "—" if ratio_genai is None else ("yes" if ratio_genai >= TARGETS["vs_genai_ngram_abs"] else "no")})
    x, y = sp("el-int4", "grounded", "ngram"), sp("llamacpp", "grounded", "lookup")
    out.append({"what": "grounded: edgellama int4 n-gram speed-up ≥ llama.cpp lookup's",
                "measured": f"{fmt(x, 2, 'x')} vs {fmt(y, 2, 'x')}",
                "met": "—" if x is None or y is None else ("yes" if x >= y else "no")})
    for label in ("el-int4", "el-fp32"):
        x = sp(label, "open", "ngram")
        out.append({"what": f"open: {NAMES[label]} n-gram ≥ {TARGETS['open_speedup']}x plain", "measured": fmt(x, 2, "x"),
                    "met": "—" if x is None else ("yes" if x >= TARGETS["open_speedup"] else "no")})
    return out


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "gguf", "float_copy", "exports")
    ap.add_argument("--prompts", type=Path, default=PROMPTS, help="prompt file (default benchmarks/prompts/speculative.json)")
    ap.add_argument("--grounded", type=int, default=None, help="use only the first N grounded prompts")
    ap.add_argument("--open", type=int, default=None, help="use only the first N open prompts")
    ap.add_argument("--systems", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=5.0, help="seconds each prompt waits for a quiet machine")
    ap.add_argument("--prepare", action="store_true", help="build missing model folders first")
    ap.add_argument("--python", default=sys.executable, help="edgellama's interpreter (default: this one)")
    ap.add_argument("--edgellama", default=None, help="edgellama CLI for --prepare (default: the edgellama script beside --python)")
    ap.add_argument("--genai-python", default=None, help="python with onnxruntime-genai (default: PEERS/genai, else --python)")
    ap.add_argument("--llamacpp-python", default=None, help="python with llama-cpp-python (default: PEERS/llamacpp)")
    ap.add_argument("--transformers-python", default=None,
                    help="python with transformers + torch (default: PEERS/optimum, else --python)")
    ap.add_argument("--out", type=Path, default=layout.RESULTS)
    return ap.parse_args()


def main() -> None:
    a = parse_args()
    lay = layout.from_args(a)
    a.exports = lay.exports
    pick = lambda given, peer: given or (lay.python(peer) if Path(lay.python(peer)).exists() else a.python)  # noqa: E731
    a.genai_python = pick(a.genai_python, "genai")
    a.transformers_python = pick(a.transformers_python, "optimum")
    a.llamacpp_python = a.llamacpp_python or lay.python("llamacpp")
    a.limit = {"grounded": a.grounded, "open": a.open}
    if a.prepare:
        prepare(a, lay)
    labels = [x for x in a.systems.split(",") if x]
    table = systems(a, lay)
    not_measured = {}
    if "llamacpp" in labels and subprocess.run([a.llamacpp_python, "-c", "import llama_cpp"],
                                               capture_output=True).returncode != 0:
        not_measured["llamacpp"] = f"llama-cpp-python not importable by {a.llamacpp_python}"
        labels.remove("llamacpp")
    prompts = render(a, lay)
    doc = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": host.machine(),
           "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
           "settings": {"rounds": a.rounds, "new_tokens": a.new_tokens, "draft_tokens": a.draft_tokens,
                        "ngram": a.ngram, "threads": a.threads, "prompts": os.path.relpath(a.prompts, layout.REPO)},
           "paths": {"gguf": str(lay.gguf), "float_copy": str(lay.float_copy), "exports": str(lay.exports)},
           "n_prompts": {s: sum(p["set"] == s for p in prompts) for s in ("grounded", "open")},
           "prompts": [{k: p[k] for k in ("id", "set", "task")} | {"prompt_tokens": len(p["ids"])} for p in prompts],
           "not_measured": not_measured}
    rounds = []
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"prompts": prompts}, f)
        ids_file = f.name
    try:
        for r in range(a.rounds):
            order = labels if r % 2 == 0 else labels[::-1]
            got = {}
            for label in order:
                log(f"round {r + 1}/{a.rounds}: {label}")
                python, args = table[label]
                got[label] = run_peer(label, python, args, ids_file, a)
            rounds.append(got)
    finally:
        os.unlink(ids_file)
    doc["summary"] = summarise(rounds, labels, prompts)
    doc["el_int4_ngram_over_genai_int4_ngram"] = vs_genai(rounds, prompts)
    doc["targets"] = targets(doc["summary"], doc["el_int4_ngram_over_genai_int4_ngram"])
    doc["rounds"] = [{k: ({kk: vv for kk, vv in v.items()}) for k, v in r.items()} for r in rounds]
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "speculative.json").write_text(_compact_json(doc) + "\n")
    text = report(doc)
    (a.out / "SPECULATIVE.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
