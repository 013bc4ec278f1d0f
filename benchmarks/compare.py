#!/usr/bin/env python3
"""edgellama against its peers on SmolLM2-135M-Instruct, every system in one run on one machine.

Peers: onnxruntime-genai (its builder and Generator), optimum (optimum-cli export,
ORTModelForCausalLM, ORTQuantizer int8), transformers (eager PyTorch) and llama.cpp
(llama-cpp-python on the GGUF as shipped). Set them up once (separate venvs, the GGUF and
a float32 copy of it; several GB):

    bash benchmarks/peers/setup_peers.sh [WORK]                  # WORK: default benchmarks/work

Then, from the repository root, with the python that has edgellama installed (~30 min
on 2 cores):

    CPULOAD_MAX_WAIT_S=15 HF_HUB_OFFLINE=1 python benchmarks/compare.py [--work WORK]

Every input is an argument with a default under --work (see benchmarks/layout.py):
--peers (venvs genai/, optimum/, llamacpp/), --gguf, --float-copy, --exports (model
folders this script writes, several GB), --text (perplexity text, default
../shared/data/GPL-3.txt from the repository root); --python is edgellama's interpreter
(default: the one running this script), --plot-python one with matplotlib for the chart
(default: the genai venv's). CPULOAD_MAX_WAIT_S: how long each timed step waits for other
processes to go quiet (default 60 s; see peers/cpuload.py).

Outputs: RESULTS.md, results.json and chart.png in --results (default benchmarks/results).
A full run replaces results.json; a partial run (--only, --sections, --skip-export)
replaces the rows it measures and keeps the others, and --report-only redraws RESULTS.md
and the chart from results.json:

    python benchmarks/compare.py --sections speed --only genai-int4 el-int4-mse --rounds 5
    python benchmarks/compare.py --skip-export        # reuse the folders under --exports
    python benchmarks/compare.py --report-only

Sections (2 threads everywhere; each timed step first waits for a quiet machine and
records other processes' CPU use):

1. export    wall time and peak RSS (GNU ``/usr/bin/time -v``) of edgellama export
             (GGUF fp32, HF-folder fp32, GGUF --bits 4 / --bits 8), optimum-cli fp32, the
             onnxruntime-genai builder fp32 / int4 (block 32) / int4 block 128, and
             optimum's ORTQuantizer avx512_vnni dynamic int8 (on optimum's fp32 export).
             Median of --export-repeats.
2. quantize  ``edgellama quantize`` on edgellama's GGUF fp32 export: int4 mse (default),
             mse-zp, --bits 8, --block-size 128.  Timed the same way.
3. speed     peers/decode_peer.py for every system (edgellama through its runtime, each
             peer in its own venv): decode tok/s after the 9-token prompt (prefill
             excluded), prefill tok/s on 512 GPL-3 tokens, cold time to first token and its
             peak RSS. With --rounds N the systems run N times, alternating the order
             (ABC, CBA, ...), one fresh process each, and the medians over rounds are kept.
             The elrt-* rows are edgellama's runtime on genai's own graphs (same graph,
             other loop). Then ``edgellama bench --prompt-tokens 512 --new-tokens 128
             --runs 3`` for the edgellama folders (decode at 512..640 context).
4. accuracy  perplexity on --text, non-overlapping windows of 512, no BOS, via
             ``edgellama eval --reference <edgellama fp32>`` (perplexity, KL, top-1
             agreement) for edgellama's folders and the optimum / genai graphs (each in a
             folder of links with edgellama's tokenizer: the peers' transformers-made
             tokenizer.json splits whitespace differently; edgellama's gives llama.cpp's
             ids exactly); llama.cpp through peers/llamacpp_ppl.py on the same token ids.
             Accuracy does not depend on timing, so --eval-jobs evaluations run side by
             side (1 thread each).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import checkout
import host
import layout
from layout import Layout
from peers.cpuload import ForeignLoad, wait_quiet

HERE = Path(__file__).resolve().parent
PEER_SCRIPTS = HERE / "peers"
THREADS = 2
SECTIONS = ["export", "quantize", "speed", "accuracy"]

# label -> (family, precision, description).  family: edgellama or a peer's name.
SYSTEMS = {
    "el-fp32":        ("edgellama", "fp32", "edgellama export GGUF (fp32)"),
    "el-fp32-hf":     ("edgellama", "fp32", "edgellama export HF folder (fp32)"),
    "el-q4_1":        ("edgellama", "int4", "edgellama export GGUF --bits 4 (exact Q4_1 import)"),
    "el-q8-export":   ("edgellama", "int8", "edgellama export GGUF --bits 8"),
    "el-int4-mse":    ("edgellama", "int4", "edgellama quantize --method mse --block-size 32"),
    "el-int4-msezp":  ("edgellama", "int4", "edgellama quantize --method mse-zp --block-size 32"),
    "el-int8":        ("edgellama", "int8", "edgellama quantize --bits 8"),
    "el-int4-b128":   ("edgellama", "int4", "edgellama quantize --method mse --block-size 128"),
    "el-int4-small":  ("edgellama", "int4", "edgellama quantize --preset small"),
    "el-int4-balanced": ("edgellama", "int4", "edgellama quantize (--preset balanced, the default)"),
    "el-int4-accurate": ("edgellama", "int4", "edgellama quantize --preset accurate"),
    "optimum-fp32":   ("optimum", "fp32", "optimum-cli export onnx, ORTModelForCausalLM"),
    "optimum-int8":   ("optimum", "int8", "ORTQuantizer avx512_vnni dynamic int8, per channel"),
    "genai-fp32":     ("genai", "fp32", "onnxruntime-genai builder -p fp32"),
    "genai-int4":     ("genai", "int4", "onnxruntime-genai builder -p int4 (block 32)"),
    "genai-int4-b128": ("genai", "int4", "onnxruntime-genai builder -p int4 block_size=128"),
    "llamacpp-q4_1":  ("llama.cpp", "int4", "llama.cpp on the shipped Q4_1 GGUF"),
    "transformers-fp32": ("transformers", "fp32", "transformers eager fp32 (PyTorch)"),
    # diagnostic: edgellama's runtime driving genai's graphs (separates the graph from the loop)
    "elrt-genai-fp32": ("diagnostic", "fp32", "edgellama runtime on genai's fp32 graph (edgellama tokenizer)"),
    "elrt-genai-int4": ("diagnostic", "int4", "edgellama runtime on genai's int4 graph (edgellama tokenizer)"),
}
# which systems each section covers (in table order)
EXPORTS = ["el-fp32", "el-fp32-hf", "el-q4_1", "el-q8-export", "optimum-fp32", "genai-fp32",
           "genai-int4", "genai-int4-b128", "optimum-int8"]
PRESETS = ["el-int4-small", "el-int4-balanced", "el-int4-accurate"]
QUANTIZES = ["el-int4-mse", "el-int4-msezp", "el-int8", "el-int4-b128", *PRESETS]
SPEED = ["el-fp32", "el-q4_1", "el-int4-mse", "el-int4-msezp", "el-int8", "el-int4-b128", *PRESETS,
         "transformers-fp32", "optimum-fp32", "genai-fp32", "optimum-int8", "genai-int4",
         "genai-int4-b128", "llamacpp-q4_1", "elrt-genai-fp32", "elrt-genai-int4"]
EL_BENCH = ["el-fp32", "el-q4_1", "el-int4-mse", "el-int4-msezp", "el-int8"]
ACCURACY = ["el-fp32", "el-q4_1", "el-q8-export", "el-int4-mse", "el-int4-msezp", "el-int8",
            "el-int4-b128", *PRESETS, "optimum-fp32", "genai-fp32", "optimum-int8", "genai-int4",
            "genai-int4-b128", "llamacpp-q4_1"]

OPTIMUM_INT8 = """
import shutil, sys
from pathlib import Path
from optimum.onnxruntime import ORTQuantizer
from optimum.onnxruntime.configuration import AutoQuantizationConfig
src, out = Path(sys.argv[1]), Path(sys.argv[2])
q = ORTQuantizer.from_pretrained(src, file_name="model.onnx")
q.quantize(save_dir=out, quantization_config=AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=True))
(out / "model_quantized.onnx").rename(out / "model.onnx")  # the name ORTModelForCausalLM and edgellama look for
for f in ("generation_config.json",):
    if (src / f).exists() and not (out / f).exists():
        shutil.copy(src / f, out / f)
"""


@dataclass(frozen=True)
class Bench:
    """Where everything is and which interpreters run what."""
    lay: Layout
    python: str          # edgellama's interpreter
    results: Path        # RESULTS.md, results.json, chart.png

    @property
    def el(self) -> list[str]:
        return [self.python, "-m", "edgellama.cli"]

    def folder(self, label: str) -> Path:
        return self.lay.exports / label

    def logs(self) -> Path:
        d = self.lay.exports / "logs"
        d.mkdir(parents=True, exist_ok=True)
        return d


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------- export / quantize

def build_commands(b: Bench) -> dict[str, list[str]]:
    """label -> command writing b.folder(label)."""
    w = lambda label: str(b.folder(label))  # noqa: E731
    gguf, f32 = str(b.lay.gguf), str(b.lay.float_copy)
    genai = [b.lay.python("genai"), "-m", "onnxruntime_genai.models.builder", "-i", f32, "-e", "cpu",
             "-c", w("genai_cache")]
    return {
        "el-fp32": [*b.el, "export", gguf, w("el-fp32")],
        "el-fp32-hf": [*b.el, "export", f32, w("el-fp32-hf")],
        "el-q4_1": [*b.el, "export", gguf, w("el-q4_1"), "--bits", "4"],
        "el-q8-export": [*b.el, "export", gguf, w("el-q8-export"), "--bits", "8"],
        "optimum-fp32": [str(b.lay.peers / "optimum" / "bin" / "optimum-cli"), "export", "onnx", "--model", f32,
                         "--task", "text-generation-with-past", w("optimum-fp32")],
        "genai-fp32": genai + ["-o", w("genai-fp32"), "-p", "fp32"],
        "genai-int4": genai + ["-o", w("genai-int4"), "-p", "int4"],
        # genai 0.18 names it block_size (int4_block_size is the deprecated alias)
        "genai-int4-b128": genai + ["-o", w("genai-int4-b128"), "-p", "int4", "--extra_options", "block_size=128"],
        "optimum-int8": [b.lay.python("optimum"), "-c", OPTIMUM_INT8, w("optimum-fp32"), w("optimum-int8")],
        "el-int4-mse": [*b.el, "quantize", w("el-fp32"), w("el-int4-mse"), "--method", "mse", "--block-size", "32"],
        "el-int4-msezp": [*b.el, "quantize", w("el-fp32"), w("el-int4-msezp"), "--method", "mse-zp",
                          "--block-size", "32"],
        "el-int8": [*b.el, "quantize", w("el-fp32"), w("el-int8"), "--bits", "8"],
        "el-int4-b128": [*b.el, "quantize", w("el-fp32"), w("el-int4-b128"), "--method", "mse", "--block-size", "128"],
        "el-int4-small": [*b.el, "quantize", w("el-fp32"), w("el-int4-small"), "--preset", "small"],
        "el-int4-balanced": [*b.el, "quantize", w("el-fp32"), w("el-int4-balanced")],
        "el-int4-accurate": [*b.el, "quantize", w("el-fp32"), w("el-int4-accurate"), "--preset", "accurate"],
    }


def parse_time_v(text: str) -> dict:
    """Wall time, peak RSS and CPU time from GNU time -v's report."""
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    sys_ = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    return {"wall_s": secs, "peak_rss_mb": rss_kb / 1024, "user_s": user, "sys_s": sys_}


def dir_size_mb(path) -> float:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files) / 1e6


def timed(cmd: list[str], out_dir: Path, logfile: Path) -> dict:
    shutil.rmtree(out_dir, ignore_errors=True)
    wait_quiet(log=log)
    with open(logfile, "w") as lf, ForeignLoad() as fl:
        p = subprocess.run(["/usr/bin/time", "-v"] + cmd, stdout=lf, stderr=subprocess.STDOUT,
                           env=env(), cwd=str(out_dir.parent))
    text = logfile.read_text(errors="replace")
    if p.returncode != 0:
        raise RuntimeError(f"exit {p.returncode}: {' '.join(cmd)[:300]}\n{text[-2000:]}")
    m = parse_time_v(text)
    m["out_mb"] = round(dir_size_mb(out_dir), 1)
    m["foreign_cpus"] = round(fl.cpus, 3)
    return m


def run_builds(labels: list[str], b: Bench, repeats: int, doc: dict, key: str) -> None:
    cmds = build_commands(b)
    b.lay.exports.mkdir(parents=True, exist_ok=True)
    for label in labels:
        runs = []
        for r in range(repeats):
            log(f"{key}: {label} ({r + 1}/{repeats})")
            try:
                runs.append(timed(cmds[label], b.folder(label), b.logs() / f"{key}-{label}.log"))
            except RuntimeError as exc:
                log(f"FAILED {label}: {exc}")
                doc[key][label] = {"command": " ".join(cmds[label]), "error": str(exc)[-1500:]}
                break
            log(f"  {runs[-1]}")
        else:
            doc[key][label] = {
                "command": " ".join(cmds[label]),
                "wall_s": round(statistics.median(x["wall_s"] for x in runs), 2),
                "best_wall_s": round(min(x["wall_s"] for x in runs), 2),
                "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in runs), 1),
                "out_mb": runs[-1]["out_mb"],
                "runs": runs,
            }
        save(doc, b)


# ----------------------------------------------------------------------------- speed

def model_path(b: Bench, label: str) -> str:
    if label == "llamacpp-q4_1":
        return str(b.lay.gguf)
    if label == "transformers-fp32":
        return str(b.lay.float_copy)
    if label.startswith("elrt-"):
        return str(b.lay.exports / "eval" / label.removeprefix("elrt-"))  # made by with_el_tokenizer
    return str(b.folder(label))


def size_mb(b: Bench, label: str) -> float:
    p = model_path(b, label)
    if os.path.isfile(p):
        return os.path.getsize(p) / 1e6
    if label == "transformers-fp32":
        return os.path.getsize(os.path.join(p, "model.safetensors")) / 1e6
    if label.startswith("elrt-"):
        p = b.folder(label.removeprefix("elrt-"))
    return dir_size_mb(p)


def peer_python(b: Bench, label: str) -> tuple[str, str]:
    """(interpreter, decode_peer.py --system) for a label."""
    fam = SYSTEMS[label][0]
    return {"edgellama": (b.python, "edgellama"), "diagnostic": (b.python, "edgellama"),
            "genai": (b.lay.python("genai"), "genai"), "optimum": (b.lay.python("optimum"), "optimum"),
            "transformers": (b.lay.python("optimum"), "transformers"),
            "llama.cpp": (b.lay.python("llamacpp"), "llamacpp")}[fam]


def decode_once(b: Bench, label: str, cold_runs: int) -> dict:
    """One fresh decode_peer.py process: warm decode and prefill (median of 3), cold starts."""
    py, system = peer_python(b, label)
    cmd = [py, str(PEER_SCRIPTS / "decode_peer.py"), "--system", system, "--model", model_path(b, label),
           "--threads", str(THREADS), "--runs", "3", "--cold-runs", str(cold_runs)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env())
    (b.logs() / f"decode-{label}.err").write_text(p.stderr)
    if p.returncode != 0:
        return {"error": p.stderr[-1500:]}
    r = json.loads(p.stdout)
    r["size_mb"] = round(size_mb(b, label), 1)
    return r


def pooled(rounds: list[dict]) -> dict:
    """One record from rounds of decode_peer.py: the first round's, with medians over the
    rounds and each round's figures under "rounds"."""
    if len(rounds) == 1:
        return rounds[0]
    med = lambda get: round(statistics.median(get(x) for x in rounds), 4)  # noqa: E731
    r = dict(rounds[0])
    for key in ("decode_tok_s", "e2e_tok_s", "prefill_512_tok_s"):
        r[key] = med(lambda x: x[key])
    if all("cold_start" in x for x in rounds):
        r["cold_start"] = {k: med(lambda x: x["cold_start"][k]) for k in ("ttft_cold_s", "load_s", "peak_rss_mb")}
    r["runs"] = {"foreign_cpus": {k: [v for x in rounds for v in x["runs"]["foreign_cpus"][k]]
                                  for k in ("decode", "prefill_512")}}
    r["rounds"] = [{"decode_tok_s": x["decode_tok_s"], "prefill_512_tok_s": x["prefill_512_tok_s"],
                    "ttft_cold_s": x.get("cold_start", {}).get("ttft_cold_s")} for x in rounds]
    return r


def run_speed(labels: list[str], b: Bench, rounds: int, cold_runs: int, doc: dict) -> None:
    for label in labels:
        if label.startswith("elrt-"):
            with_el_tokenizer(b, label.removeprefix("elrt-"))
    got: dict[str, list[dict]] = {label: [] for label in labels}
    for r in range(rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:  # neither end always runs first
            if got[label] and "error" in got[label][-1]:
                continue
            log(f"decode: {label}" + (f" (round {r + 1}/{rounds})" if rounds > 1 else ""))
            res = decode_once(b, label, cold_runs)
            got[label].append(res)
            if "error" in res:
                doc["decode"][label] = res
                log(f"FAILED decode {label}: {res['error']}")
            else:
                doc["decode"][label] = pooled(got[label])
                log(f"  decode {res['decode_tok_s']} tok/s, prefill-512 {res['prefill_512_tok_s']}, "
                    f"cold ttft {res.get('cold_start', {}).get('ttft_cold_s')}")
            save(doc, b)
    for label in [x for x in labels if x in EL_BENCH]:
        run_el_bench(b, label, doc)


def run_el_bench(b: Bench, label: str, doc: dict) -> None:
    cmd = [*b.el, "bench", str(b.folder(label)), "--json", "--threads", str(THREADS),
           "--prompt-tokens", "512", "--new-tokens", "128", "--runs", "3"]
    log(f"edgellama bench: {label}")
    wait_quiet(log=log)
    with ForeignLoad() as fl:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if p.returncode != 0:
        log(f"FAILED bench {label}: {p.stderr[-1500:]}")
        doc["el_bench"][label] = {"error": p.stderr[-1500:]}
    else:
        r = json.loads(p.stdout)
        r["foreign_cpus"] = round(fl.cpus, 3)
        doc["el_bench"][label] = r
        log(f"  decode@512 {r['decode_tok_s']['median']:.1f} tok/s, prefill {r['prefill_tok_s']['median']:.0f}")
    save(doc, b)


# ----------------------------------------------------------------------------- accuracy

def with_el_tokenizer(b: Bench, label: str) -> Path:
    """A peer's graph + config with edgellama's tokenizer (same token ids): hard links (a
    copy across file systems) for the graph and its weights, whose external-data paths the
    runtime refuses to follow out of the folder through a symlink; symlinks for the rest.

    genai's tokenizer.json and optimum's (both converted from the GGUF by transformers)
    split whitespace differently from llama.cpp; edgellama's matches llama.cpp exactly."""
    return link_with_tokenizer(b.folder(label), b.folder("el-fp32"), b.lay.exports / "eval" / label)


def link_with_tokenizer(src: Path, tok: Path, d: Path) -> Path:
    """Folder `d` (made afresh): `src`'s graph and config, `tok`'s tokenizer files (those it has)."""
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for f in ("model.onnx", "model.onnx.data", "model.onnx_data", "genai_config.json", "config.json",
              "generation_config.json"):
        if not (src / f).exists():
            continue
        if f.startswith("model.onnx"):
            try:
                os.link(src / f, d / f)
            except OSError:
                shutil.copyfile(src / f, d / f)
        else:
            (d / f).symlink_to(src / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok / f).exists():
            (d / f).symlink_to(tok / f)
    return d


def eval_one(b: Bench, label: str) -> dict:
    t0 = time.perf_counter()
    if label == "llamacpp-q4_1":
        cmd = [b.lay.python("llamacpp"), str(PEER_SCRIPTS / "llamacpp_ppl.py"), str(b.lay.gguf),
               str(b.lay.exports / "eval" / "text_ids.json"), "--window", "512", "--threads", "1"]
    else:
        peer = label.startswith(("genai", "optimum"))
        target = with_el_tokenizer(b, label) if peer else b.folder(label)
        cmd = [*b.el, "eval", str(target), "--text", str(b.lay.text), "--window", "512", "--json", "--threads", "1"]
        if label != "el-fp32":
            cmd += ["--reference", str(b.folder("el-fp32"))]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if p.returncode != 0:
        return {"command": " ".join(cmd), "error": p.stderr[-1500:]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["command"] = " ".join(cmd)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def run_accuracy(labels: list[str], b: Bench, jobs: int, doc: dict) -> None:
    (b.lay.exports / "eval").mkdir(parents=True, exist_ok=True)
    # token ids of the text from edgellama's tokenizer, for llama.cpp
    code = ("import json,sys;from edgellama.runtime.model import Model;"
            "ids=Model.load(sys.argv[1]).encode(open(sys.argv[2],encoding='utf-8').read());"
            "json.dump({'ids':ids},open(sys.argv[3],'w'))")
    subprocess.run([b.python, "-c", code, str(b.folder("el-fp32")), str(b.lay.text),
                    str(b.lay.exports / "eval" / "text_ids.json")], check=True, env=env())
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {label: pool.submit(eval_one, b, label) for label in labels}
        for label, fut in futs.items():
            r = fut.result()
            doc["accuracy"][label] = r
            log(f"eval {label}: {r.get('perplexity', r.get('error', '')[-300:])}")
            save(doc, b)


# ----------------------------------------------------------------------------- results

def versions(b: Bench) -> dict:
    code = ("import importlib.metadata as m,json,sys\nout={}\nfor n in sys.argv[1:]:\n try: out[n]=m.version(n)\n"
            " except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    want = {"edgellama": (b.python, ["edgellama", "onnxruntime", "onnx", "numpy", "tokenizers"]),
            "genai": (b.lay.python("genai"), ["onnxruntime-genai", "onnxruntime", "transformers"]),
            "optimum": (b.lay.python("optimum"), ["optimum", "optimum-onnx", "onnxruntime", "transformers", "torch"]),
            "llamacpp": (b.lay.python("llamacpp"), ["llama-cpp-python", "numpy"])}
    out = {}
    for venv, (py, names) in want.items():
        try:
            p = subprocess.run([py, "-c", code] + names, capture_output=True, text=True)
            out[venv] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-300:]}
        except OSError as exc:
            out[venv] = {"error": str(exc)}
    return out


def edgellama_checkout(b: Bench) -> dict:
    """The checkout edgellama's interpreter imports edgellama from (commit, modified)."""
    p = subprocess.run([b.python, "-c", checkout.WHERE], capture_output=True, text=True)
    if p.returncode != 0:
        return {"error": p.stderr[-300:]}
    return checkout.describe(Path(p.stdout.strip()).parents[1])


def save(doc: dict, b: Bench) -> None:
    b.results.mkdir(parents=True, exist_ok=True)
    tmp = b.results / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    tmp.replace(b.results / "results.json")


def load_doc(results: Path, fresh: bool) -> dict:
    p = results / "results.json"
    doc = json.loads(p.read_text()) if p.exists() and not fresh else {}
    for k in ("export", "quantize", "decode", "el_bench", "accuracy"):
        doc.setdefault(k, {})
    return doc


def fmt(x, nd=1, dash="—"):
    if x is None:
        return dash
    return f"{x:,.{nd}f}"


def best_peer(section: dict, precision: str, key, better) -> tuple[str | None, float | None]:
    cands = [(label, key(r)) for label, r in section.items()
             if label in SYSTEMS and SYSTEMS[label][0] not in ("edgellama", "diagnostic")
             and SYSTEMS[label][1] == precision
             and "error" not in r and key(r) is not None]
    if not cands:
        return None, None
    return better(cands, key=lambda c: c[1])


def ratio(a, b, nd=2):
    if a is None or b is None or b == 0:
        return "—"
    return f"{a / b:.{nd}f}×"


def short_command(cmd: str, setup: dict) -> str:
    """A recorded command with the run's paths as $W (exports), $GGUF, $F32, $PEERS."""
    for key, name in (("gguf", "$GGUF"), ("float_copy", "$F32"), ("exports", "$W"), ("work", "$W"), ("peers", "$PEERS")):
        if setup.get(key) and (key != "work" or "exports" not in setup):
            cmd = cmd.replace(setup[key], name)
    cmd = re.sub(r"\S*/bin/python -m edgellama\.cli\b|\S*/bin/edgellama\b", "edgellama", cmd)
    return re.sub(r"\S*/(genai|optimum|llamacpp)/bin/", r"$PEERS/\1/bin/", cmd)
def report(doc: dict) -> str:
    L = ["# edgellama vs peers — SmolLM2-135M-Instruct, CPU, 2 threads", "",
         "Written by `benchmarks/compare.py` from [results.json](results.json); `python benchmarks/compare.py "
         "--help` gives the method and every path. A later run replaces this file.", ""]
    L += [f"Machine: {host.describe(doc.get('machine', {}))}. "
          f"Measured {doc.get('measured_at', '?')}; full run took {fmt(doc.get('run_seconds', {}).get('total'), 0)} s. "
          "Medians; `foreign` = CPUs used by other processes during the timed runs.", ""]
    if "updated" in doc:
        L += [f"Some rows re-measured {doc['updated']['at']}: `{short_command(doc['updated']['command'], doc.get('setup', {}))}`.", ""]
    L += ["Versions: " + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in vs.items())
                                   for k, vs in doc.get("versions", {}).items() if isinstance(vs, dict)), ""]

    # export / quantize
    for key, title, labels in (("export", "1. Export", EXPORTS), ("quantize", "2. Quantize (from edgellama's fp32 export)", QUANTIZES)):
        sec = doc.get(key, {})
        if not sec:
            continue
        L += [f"## {title}", "",
              "| system | precision | wall s | peak RSS MB | output MB | best peer of same precision | peer/edgellama time | peer/edgellama RSS |",
              "|---|---|---|---|---|---|---|---|"]
        allbuild = {**doc.get("export", {}), **doc.get("quantize", {})}
        for label in labels:
            r = sec.get(label)
            if r is None:
                continue
            fam, prec, desc = SYSTEMS[label]
            if "error" in r:
                L.append(f"| {label} | {prec} | FAILED | | | | | |")
                continue
            cmp_time = cmp_rss = peer = ""
            if fam == "edgellama":
                peer, t = best_peer(allbuild, prec, lambda x: x.get("wall_s"), min)
                if peer:
                    cmp_time = ratio(t, r["wall_s"])
                    cmp_rss = ratio(allbuild[peer]["peak_rss_mb"], r["peak_rss_mb"])
            L.append(f"| {label} | {prec} | {fmt(r['wall_s'], 2)} | {fmt(r['peak_rss_mb'], 0)} | {fmt(r['out_mb'], 1)} "
                     f"| {peer or ''} | {cmp_time} | {cmp_rss} |")
        L += [""]
    if doc.get("export") or doc.get("quantize"):
        L += ["Notes: ratios are best peer of the same precision / edgellama (above 1 = edgellama faster or "
              "smaller). `optimum-int8` is ORTQuantizer on optimum's fp32 export, so its time excludes that "
              "export; `el-q8-export` re-quantizes the GGUF's Q4_1 weights to 8 bits in one pass.", "",
              "Commands (`$W` = the --exports folder, `$GGUF` and `$F32` = the GGUF and its float copy, "
              "`$PEERS` = the peer venvs):", ""]
        for k, v in {**doc.get("export", {}), **doc.get("quantize", {})}.items():
            if "command" not in v:
                continue
            cmd = short_command(v["command"], doc.get("setup", {}))
            if k == "optimum-int8":
                cmd = "$PEERS/optimum/bin/python -c <OPTIMUM_INT8 in compare.py> $W/optimum-fp32 $W/optimum-int8"
            L.append(f"- `{k}`: `{cmd}`")
        L += [""]

    # speed
    dec = doc.get("decode", {})
    if dec:
        L += ["## 3. Speed", "",
              "Decode: 128 greedy tokens after the 9-token prompt, prefill excluded (peers/decode_peer.py, "
              "the same code path for every system). Prefill: one forward over 512 GPL-3 tokens. "
              "Cold TTFT: fresh process → first token of the 9-token prompt (imports + load + prefill).",
              "",
              "| system | precision | decode tok/s | vs best peer | prefill-512 tok/s | vs best peer | cold TTFT s | cold peak RSS MB | size MB | foreign CPUs (decode) |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        dkey = lambda x: x.get("decode_tok_s")  # noqa: E731
        pkey = lambda x: x.get("prefill_512_tok_s")  # noqa: E731
        for label in SPEED:
            r = dec.get(label)
            if r is None:
                continue
            fam, prec, _ = SYSTEMS[label]
            if "error" in r:
                L.append(f"| {label} | {prec} | FAILED | | | | | | | |")
                continue
            vs_d = vs_p = ""
            if fam == "edgellama":
                peer, d = best_peer(dec, prec, dkey, max)
                vs_d = f"{ratio(r['decode_tok_s'], d)} {peer}" if peer else ""
                peer, pf = best_peer(dec, prec, pkey, max)
                vs_p = f"{ratio(r['prefill_512_tok_s'], pf)} {peer}" if peer else ""
            cs = r.get("cold_start", {})
            fc = r.get("runs", {}).get("foreign_cpus", {}).get("decode", [])
            L.append(f"| {label} | {prec} | {fmt(r['decode_tok_s'])} | {vs_d} | {fmt(r['prefill_512_tok_s'], 0)} | {vs_p} "
                     f"| {fmt(cs.get('ttft_cold_s'), 3)} | {fmt(cs.get('peak_rss_mb'), 0)} | {fmt(r.get('size_mb'), 1)} "
                     f"| {', '.join(f'{x:.2f}' for x in fc)} |")
        L += [""]
        if any("rounds" in r for r in dec.values()):
            L += ["Rows measured in several rounds (`rounds` in results.json: the systems' order alternating, one "
                  "fresh process each) give the medians over those rounds.", ""]
        texts = {k: v["first32_ids"] for k, v in dec.items() if "first32_ids" in v}
        if "el-fp32" in texts:
            ref = texts["el-fp32"]
            agree = {k: next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ids)) for k, ids in texts.items()}
            L += ["Greedy agreement with el-fp32 (leading tokens equal, of 32): "
                  + ", ".join(f"{k} {v}" for k, v in agree.items()), ""]
    eb = doc.get("el_bench", {})
    if eb:
        L += ["`edgellama bench --prompt-tokens 512 --new-tokens 128 --runs 3 --threads 2` (decode at context 512..640; "
              "cold TTFT includes a 512-token prefill):", "",
              "| system | decode tok/s | prefill tok/s | warm TTFT s | cold TTFT s | load s | peak RSS MB | size MiB |",
              "|---|---|---|---|---|---|---|---|"]
        for label in EL_BENCH:
            r = eb.get(label)
            if r is None or "error" in r:
                if r is not None:
                    L.append(f"| {label} | FAILED | | | | | | |")
                continue
            L.append(f"| {label} | {fmt(r['decode_tok_s']['median'])} | {fmt(r['prefill_tok_s']['median'], 0)} "
                     f"| {fmt(r['ttft_warm_s']['median'], 3)} | {fmt((r.get('ttft_cold_s') or {}).get('median'), 3)} "
                     f"| {fmt(r['load_s']['median'], 3)} | {fmt(r['peak_rss_mb'], 0)} | {fmt(r['size_mb'], 1)} |")
        L += [""]

    # accuracy
    acc = doc.get("accuracy", {})
    if acc:
        L += ["## 4. Accuracy", "",
              "GPL-3 text, edgellama's token ids, windows of 512 (non-overlapping, no BOS). KL(el-fp32 ‖ model) "
              "in nats/token and top-1 agreement against edgellama's fp32 export.", "",
              "| system | precision | perplexity | vs el-fp32 | vs best peer | KL | top-1 agree | tokens |",
              "|---|---|---|---|---|---|---|---|"]
        base = acc.get("el-fp32", {}).get("perplexity")
        key = lambda x: x.get("perplexity")  # noqa: E731
        for label in ACCURACY:
            r = acc.get(label)
            if r is None:
                continue
            fam, prec, _ = SYSTEMS[label]
            if "error" in r:
                L.append(f"| {label} | {prec} | FAILED | | | | | |")
                continue
            vs = ""
            if fam == "edgellama":
                peer, p = best_peer(acc, prec, key, min)
                vs = f"{ratio(r['perplexity'], p, 3)} {peer}" if peer else ""
            rel = f"{(r['perplexity'] / base - 1) * 100:+.2f} %" if base else ""
            L.append(f"| {label} | {prec} | {r['perplexity']:.3f} | {rel} | {vs} | {fmt(r.get('kl'), 4)} "
                     f"| {fmt(r.get('top1_agreement') and 100 * r['top1_agreement'], 1)}{' %' if r.get('top1_agreement') else ''} | {r['tokens']} |")
        L += [""]
    shown = {label for sec in ("export", "quantize", "decode", "accuracy") for label in doc.get(sec, {})}
    L += ["Systems: " + "; ".join(f"`{k}` = {v[2]}" for k, v in SYSTEMS.items() if k in shown), ""]
    return "\n".join(L).rstrip() + "\n"


CHART = r"""
import json, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
rows = json.load(open(sys.argv[1]))
labels = [r["label"] for r in rows]
palette = {"edgellama": "#1f77b4", "diagnostic": "#9e9e9e"}
colors = [palette.get(r["family"], "#ff7f0e") for r in rows]
CAP = 100.0  # perplexity axis limit: a broken model (ppl in the thousands) would hide the rest
fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.6), sharey=True)
for ax, key, title in ((axes[0], "decode", "decode tok/s (9-token prompt, 2 threads) — higher is better"),
                       (axes[1], "ppl", "GPL-3 perplexity (512 windows) — lower is better")):
    vals = [r[key] or 0 for r in rows]
    cap = CAP if key == "ppl" else max(vals + [1]) * 1.18
    shown = [min(v, cap / 1.18) for v in vals]
    bars = ax.barh(range(len(rows)), shown, color=colors)
    for b, v, r in zip(bars, vals, rows):
        label = " n/a" if not r[key] else (f" {v:,.0f} (off scale)" if v > cap / 1.18 else f" {v:.1f}")
        if v > cap / 1.18:
            b.set_hatch("//")
        ax.text(b.get_width(), b.get_y() + b.get_height() / 2, label, va="center", fontsize=8)
    ax.set_title(title, fontsize=10)
    ax.set_xlim(0, cap)
    ax.grid(axis="x", alpha=0.3)
axes[0].set_yticks(range(len(rows)))
axes[0].set_yticklabels([f"{r['label']} ({r['precision']})" for r in rows], fontsize=9)
axes[0].invert_yaxis()
ref = [r["ppl"] for r in rows if r["label"] == "el-fp32"]
if ref:
    axes[1].axvline(ref[0], color="gray", ls="--", lw=1)
from matplotlib.patches import Patch
fig.legend(handles=[Patch(color="#1f77b4", label="edgellama"), Patch(color="#ff7f0e", label="peers"),
                    Patch(color="#9e9e9e", label="edgellama runtime on genai's graph")],
           loc="lower center", ncol=3, fontsize=9)
fig.suptitle(sys.argv[3], fontsize=11)
fig.tight_layout(rect=(0, 0.04, 1, 0.96))
fig.savefig(sys.argv[2], dpi=110)
"""


def chart(doc: dict, b: Bench, plot_python: str) -> None:
    rows = []
    for label in dict.fromkeys(SPEED + ACCURACY):
        d = doc["decode"].get(label, {})
        a = doc["accuracy"].get(label, {})
        if not d.get("decode_tok_s") and not a.get("perplexity"):
            continue
        fam, prec, _ = SYSTEMS[label]
        rows.append({"label": label, "family": fam, "precision": prec,
                     "decode": d.get("decode_tok_s"), "ppl": a.get("perplexity")})
    if not rows:
        return
    order = {"fp32": 0, "int8": 1, "int4": 2}
    rows.sort(key=lambda r: (order[r["precision"]], r["family"] != "edgellama"))
    title = f"SmolLM2-135M-Instruct on {doc.get('machine', {}).get('cpu')}, 2 threads"
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "chart_data.json"
        data.write_text(json.dumps(rows, indent=1))
        try:
            p = subprocess.run([plot_python, "-c", CHART, str(data), str(b.results / "chart.png"), title],
                               capture_output=True, text=True)
        except OSError as exc:
            log(f"chart.png not drawn ({exc}); --plot-python names a python with matplotlib")
            return
    if p.returncode != 0:
        log(f"chart.png not drawn: {p.stderr[-1500:]}")


# ----------------------------------------------------------------------------- main

def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "gguf", "float_copy", "exports", "text")
    ap.add_argument("--python", default=sys.executable,
                    help="interpreter with edgellama installed (default: the one running this script)")
    ap.add_argument("--plot-python", help="a python with matplotlib, for chart.png (default: PEERS/genai/bin/python)")
    ap.add_argument("--results", type=Path, default=layout.RESULTS,
                    help="where RESULTS.md, results.json and chart.png go (default: benchmarks/results)")
    ap.add_argument("--sections", nargs="+", default=SECTIONS, choices=SECTIONS)
    ap.add_argument("--skip-export", action="store_true", help="same as leaving out export and quantize")
    ap.add_argument("--only", nargs="+", metavar="LABEL", help=f"restrict every section to these: {' '.join(SYSTEMS)}")
    ap.add_argument("--export-repeats", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=1, help="speed: rounds over the systems, order alternating")
    ap.add_argument("--cold-runs", type=int, default=3, help="speed: fresh processes per system per round")
    ap.add_argument("--eval-jobs", type=int, default=2, help="accuracy: evaluations side by side (1 thread each)")
    ap.add_argument("--report-only", action="store_true", help="only redraw RESULTS.md and chart.png from results.json")
    args = ap.parse_args()
    if args.only and (bad := set(args.only) - set(SYSTEMS)):
        ap.error(f"unknown labels {sorted(bad)}")
    return args


def record_setup(doc: dict, b: Bench, args: argparse.Namespace, full: bool) -> None:
    """A full run records the machine, versions and paths; a partial one only itself."""
    command = " ".join([sys.executable] + sys.argv)
    if not full and "setup" in doc:
        doc["updated"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S"), "command": command}
        return
    doc["machine"] = host.machine()
    doc["versions"] = versions(b)
    doc["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    lay = b.lay
    doc["setup"] = {"gguf": str(lay.gguf), "float_copy": str(lay.float_copy), "text": str(lay.text),
                    "exports": str(lay.exports), "peers": str(lay.peers), "threads": THREADS,
                    "edgellama": edgellama_checkout(b), "command": command}


def main() -> None:
    args = parse_args()
    b = Bench(lay=layout.from_args(args), python=args.python, results=args.results.resolve())
    pick = lambda labels: [x for x in labels if not args.only or x in args.only]  # noqa: E731
    sections = [] if args.report_only else [s for s in args.sections
                                            if not (args.skip_export and s in ("export", "quantize"))]
    if {"export", "quantize"} & set(sections) and not os.path.exists("/usr/bin/time"):
        sys.exit("GNU time missing: apt-get install -y time")
    full = sections == SECTIONS and not args.only
    doc = load_doc(b.results, fresh=full)
    if sections:
        record_setup(doc, b, args, full)
    seconds = doc.setdefault("run_seconds", {})
    t_all = time.perf_counter()
    for sec in sections:
        t = time.perf_counter()
        log(f"=== {sec}")
        if sec == "export":
            run_builds(pick(EXPORTS), b, args.export_repeats, doc, "export")
        elif sec == "quantize":
            run_builds(pick(QUANTIZES), b, args.export_repeats, doc, "quantize")
        elif sec == "speed":
            run_speed(pick(SPEED), b, args.rounds, args.cold_runs, doc)
        elif sec == "accuracy":
            run_accuracy(pick(ACCURACY), b, args.eval_jobs, doc)
        if not args.only:  # a partial re-run does not overwrite the full run's section times
            seconds[sec] = round(time.perf_counter() - t, 1)
        save(doc, b)
    if full:
        seconds["total"] = round(time.perf_counter() - t_all, 1)
        save(doc, b)
    b.results.mkdir(parents=True, exist_ok=True)
    (b.results / "RESULTS.md").write_text(report(doc))
    chart(doc, b, args.plot_python or b.lay.python("genai"))
    log(f"wrote {b.results}/RESULTS.md")


if __name__ == "__main__":
    main()
