#!/usr/bin/env python3
"""Cold start of uncompiled vs compiled vs ORT-format vs bundled SmolLM2, and onnxruntime-genai.

    HF_HUB_OFFLINE=1 python benchmarks/cold_start.py [--runs 5] [--work WORK] [--baseline CHECKOUT]

Sources: the edgellama folders compare.py exports (fp32: EXPORTS/el-fp32, int4:
EXPORTS/el-int4-mse; or --fp32 / --int4 FOLDER). For each it compiles into WORK/cold-start:
`compile` (onnx, level all, prepacked weights), `compile --no-prepack`,
`compile --format ort`, and `pack` of the prepacked folder. Each variant then runs in
--runs fresh processes, interleaved (run 1 of every variant, then run 2, ...) so a busy
machine weighs on all alike, each waiting for a quiet machine first (cpuload.py):

* cold first token: from just before the process is spawned to its first new token of
  the 9-token prompt (interpreter, imports, Model.load, prefill); median.
* session: onnxruntime session creation alone inside Model.load; median.
* load: all of Model.load (manifest, checks, tokenizer, template, session; for a bundle
  also the SHA-256 check and unpacking); median.
* peak RSS: the child's VmHWM after the first token (genai's child: ru_maxrss); median.
* CPU s: the child's user + system CPU time over its whole life (to first token, then
  exit); less disturbed than wall time when other processes share the cores; median.
* size: the folder's files (the bundle file for a bundle).

onnxruntime-genai runs its own exports (EXPORTS/genai-fp32, EXPORTS/genai-int4; or
--genai-fp32 / --genai-int4) in its own venv (PEERS/genai) through peers/decode_peer.py
--child-ttft (its load = og.Model + og.Tokenizer); left out where either is missing.

--baseline CHECKOUT adds "uncompiled, baseline runtime": the same uncompiled folder loaded by
the edgellama runtime of another checkout (e.g. `git worktree add /tmp/base <commit>`, mapped
as `edgellama` by benchmarks/checkout.py, as ab.py does), to measure what a runtime change
did to cold start in the same interleaved run.

Writes COLD_START.md and cold_start.json (every run) to --results (default
benchmarks/results), replacing the last ones.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import checkout
import host
import layout
from peers.cpuload import ForeignLoad, wait_quiet

HERE = Path(__file__).resolve().parent
PROMPT_IDS = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]
SOURCES = {"fp32": "el-fp32", "int4": "el-int4-mse"}   # precision -> compare.py's export
GENAI = {"fp32": "genai-fp32", "int4": "genai-int4"}

# Session time comes from wrapping the runtime's session factory where it has one (a
# private name that may move; the column is then left empty).
CHILD = r"""
import json, sys, time
import edgellama.runtime.model as M
spent = []
make = getattr(M, "make_session", None)
def timed(*a, **k):
    t = time.perf_counter(); s = make(*a, **k); spent.append(time.perf_counter() - t); return s
if make is not None:
    M.make_session = timed
t = time.perf_counter()
model = M.Model.load(sys.argv[1], threads=2)
load = time.perf_counter() - t
def hwm():  # this process's peak RSS (ru_maxrss would include the parent's, inherited across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
rss_load = hwm()
step = next(iter(model.generate(json.loads(sys.argv[2]), max_new_tokens=1, ignore_eos=True)))
print(json.dumps({"t_first_wall": time.time(), "load_s": load, "token": step.token_id,
                  **({"session_s": sum(spent)} if spent else {}),
                  "rss_load_mb": rss_load, "peak_rss_mb": hwm()}))
"""


def cli(*args: str) -> None:
    """The edgellama CLI in a child process: this one stays small, and the peers' children
    (which report ru_maxrss, inherited across exec on Linux) are not charged its memory."""
    subprocess.run([sys.executable, "-m", "edgellama.cli", *args], check=True)


# (variant, command, path it gets as its last argument, environment or None to inherit)
Variant = tuple[str, list[str], Path, "dict | None"]


def prepare(args: argparse.Namespace, lay: layout.Layout, precisions: list[str]) -> dict[str, list[Variant]]:
    """{precision: variants}, compiling what is missing into WORK/cold-start."""
    work = lay.work / "cold-start"
    work.mkdir(parents=True, exist_ok=True)
    baseline_env = checkout.checkout_env(args.baseline, work / "shims") if args.baseline else None
    if baseline_env:
        checkout.check_import(args.baseline, baseline_env)
    py = [sys.executable, "-c", CHILD]
    plan = {}
    for prec in precisions:
        src = getattr(args, prec) or lay.exports / SOURCES[prec]
        if not (src / "edgellama.json").is_file():
            raise SystemExit(f"{src}: no edgellama model folder; run compare.py's export and quantize "
                             f"steps or pass --{prec} FOLDER")
        compiled = {"compiled (onnx, prepacked)": (work / f"{prec}-onnx", []),
                    "compiled (onnx, no prepack)": (work / f"{prec}-onnx-noprepack", ["--no-prepack"]),
                    "compiled (ORT format)": (work / f"{prec}-ort", ["--format", "ort"])}
        for out, options in compiled.values():
            if not out.exists():
                cli("compile", str(src), str(out), *options)
        bundle = work / f"{prec}.edgellama"
        if not bundle.exists():
            cli("pack", str(work / f"{prec}-onnx"), str(bundle))
        plan[prec] = [("uncompiled", py, src, None)] + [(name, py, out, None) for name, (out, _) in compiled.items()]
        if baseline_env:
            plan[prec].insert(1, ("uncompiled, baseline runtime", py, src, baseline_env))
        plan[prec].append(("bundle of compiled (verified)", py, bundle, None))
        genai = getattr(args, f"genai_{prec}") or lay.exports / GENAI[prec]
        if Path(lay.python("genai")).exists() and genai.exists():
            plan[prec].append(("onnxruntime-genai", [lay.python("genai"), str(HERE / "peers" / "decode_peer.py"),
                                                     "--child-ttft", "--system", "genai", "--threads", "2",
                                                     "--model"], genai, None))
    return plan


def one(cmd: list[str], path: Path, env: dict | None) -> dict:
    args = cmd + [str(path)] + ([json.dumps(PROMPT_IDS)] if "-c" in cmd else [])
    wait_quiet(max_wait_s=float(os.environ.get("CPULOAD_MAX_WAIT_S", "20")))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ForeignLoad() as fl:
        t = time.time()
        p = subprocess.run(args, capture_output=True, text=True, env=env)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if p.returncode != 0:
        raise RuntimeError(f"{path}: child failed\n{p.stderr[-2000:]}")
    r = json.loads(p.stdout.strip().splitlines()[-1])
    r["ttft_s"] = r.pop("t_first_wall") - t
    r["foreign_cpus"] = fl.cpus
    r["cpu_s"] = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return r


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "exports")
    for prec in SOURCES:
        ap.add_argument(f"--{prec}", type=Path, help=f"{prec} edgellama folder (default: EXPORTS/{SOURCES[prec]})")
        ap.add_argument(f"--genai-{prec}", type=Path, help=f"genai's {prec} export (default: EXPORTS/{GENAI[prec]})")
    ap.add_argument("--runs", type=int, default=5, help="fresh processes per variant (default 5)")
    ap.add_argument("--baseline", type=Path, default=None, help="another checkout's runtime, on the uncompiled folder")
    ap.add_argument("--only", choices=sorted(SOURCES), default=None, help="one precision only")
    ap.add_argument("--results", type=Path, default=layout.RESULTS,
                    help="folder for COLD_START.md and cold_start.json (default: benchmarks/results)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    lay = layout.from_args(args)
    plan = prepare(args, lay, [args.only] if args.only else list(SOURCES))
    results: dict[str, dict[str, list[dict]]] = {p: {v[0]: [] for v in variants} for p, variants in plan.items()}
    for prec, variants in plan.items():
        for _, cmd, path, env in variants:  # warm the page cache: every variant reads from memory
            one(cmd, path, env)
        for i in range(args.runs):
            for name, cmd, path, env in variants:
                results[prec][name].append(one(cmd, path, env))
            print(f"{prec}: round {i + 1}/{args.runs} done", file=sys.stderr)
    doc = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": host.machine(),
           "onnxruntime": metadata.version("onnxruntime"),
           "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
           "sources": {p: {v[0]: str(v[2]) for v in variants} for p, variants in plan.items()},
           "baseline": checkout.describe(args.baseline) if args.baseline else None,
           "runs": results}
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "cold_start.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = report(doc, plan, results)
    (args.results / "COLD_START.md").write_text(text)
    print(text)


def report(doc: dict, plan, results) -> str:
    base = doc["baseline"]
    L = ["# Cold start: uncompiled vs `edgellama compile` vs ORT format vs a bundle, and onnxruntime-genai", "",
         "Written by `benchmarks/cold_start.py` from [cold_start.json](cold_start.json) (every run); "
         "`python benchmarks/cold_start.py --help` gives the method. A later run replaces this file.", "",
         f"Machine: {host.describe(doc['machine'])}; onnxruntime {doc['onnxruntime']}, 2 threads. "
         f"Measured {doc['measured_at']}.", "",
         f"- command: `{doc['command']}`"]
    if base:
        L.append(f"- baseline runtime: `{base['path']}` at {(base['commit'] or '?')[:10]}"
                 + (" with uncommitted changes" if base["modified"] else ""))
    L += ["", table(plan, results), "",
          "Columns: cold first token = spawn → first new token of the 9-token prompt (interpreter, imports, "
          "`Model.load`, prefill), median; vs uncompiled = that time over the uncompiled folder's; CPU s = the "
          "child's user + system time to first token and exit; session = onnxruntime session creation; load = "
          "all of `Model.load`; peak RSS = the child's VmHWM (genai's child: ru_maxrss); foreign CPUs = other "
          "processes' CPU use meanwhile."]
    return "\n".join(L) + "\n"


def table(plan, results) -> str:
    med = lambda runs, k: statistics.median(r[k] for r in runs) if all(k in r for r in runs) else None  # noqa: E731
    lines = ["| model | variant | cold first token s | vs uncompiled | CPU s | session s | load s | peak RSS MB "
             "| size MB | foreign CPUs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for prec, variants in plan.items():
        base = med(results[prec]["uncompiled"], "ttft_s")
        for name, _, path, _ in variants:
            runs = results[prec][name]
            ttft, sess = med(runs, "ttft_s"), med(runs, "session_s")
            lines.append(f"| {prec} | {name} | {ttft:.3f} | {base / ttft:.2f}× | {med(runs, 'cpu_s'):.3f} | "
                         f"{'-' if sess is None else f'{sess:.3f}'} | {med(runs, 'load_s'):.3f} | "
                         f"{med(runs, 'peak_rss_mb'):.0f} | {size_mb(path):.0f} | {med(runs, 'foreign_cpus'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
