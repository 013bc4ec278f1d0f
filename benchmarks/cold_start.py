#!/usr/bin/env python3
"""Cold start of uncompiled vs compiled vs ORT-format vs bundled SmolLM2, and onnxruntime-genai.

    HF_HUB_OFFLINE=1 python benchmarks/cold_start.py [--runs 5] [--work /tmp/edgellama-cold]

For each source (fp32: /work/compare/el-fp32, int4: /work/compare/el-int4-mse) it compiles
into --work: `compile` (onnx, level all, prepacked weights), `compile --no-prepack`,
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

onnxruntime-genai runs its own exports (/work/peers/out/genai-*) in its own venv through
benchmarks/peers/decode_peer.py --child-ttft (its load = og.Model + og.Tokenizer).

--baseline CHECKOUT adds "uncompiled, baseline runtime": the same uncompiled folder loaded by
the edgellama runtime of another checkout (e.g. `git worktree add /tmp/base <commit>`), to
measure what a runtime change did to cold start in the same interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))
from cpuload import ForeignLoad, wait_quiet  # noqa: E402

PROMPT_IDS = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]
SOURCES = {"fp32": Path("/work/compare/el-fp32"), "int4": Path("/work/compare/el-int4-mse")}
GENAI = {"fp32": Path("/work/peers/out/genai-fp32"), "int4": Path("/work/peers/out/genai-int4")}
GENAI_PYTHON = Path("/work/peers/genai/bin/python")

CHILD = r"""
import json, sys, time
import edgellama.runtime.model as M
spent = []
make = M.make_session
def timed(*a, **k):
    t = time.perf_counter(); s = make(*a, **k); spent.append(time.perf_counter() - t); return s
M.make_session = timed
t = time.perf_counter()
model = M.Model.load(sys.argv[1], threads=2)
load = time.perf_counter() - t
def hwm():  # this process's peak RSS (ru_maxrss would include the parent's, inherited across exec)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) / 1024
rss_load = hwm()
step = next(iter(model.generate(json.loads(sys.argv[2]), max_new_tokens=1, ignore_eos=True)))
print(json.dumps({"t_first_wall": time.time(), "load_s": load, "session_s": sum(spent), "token": step.token_id,
                  "rss_load_mb": rss_load, "peak_rss_mb": hwm()}))
"""


def cli(*args: str) -> None:
    """The edgellama CLI in a child process: this one stays small, and the peers' children
    (which report ru_maxrss, inherited across exec on Linux) are not charged its memory."""
    subprocess.run([sys.executable, "-m", "edgellama.cli", *args], check=True)


def prepare(work: Path, baseline: Path | None = None) -> dict[str, list[tuple[str, list[str], Path]]]:
    """{precision: [(variant, command, path)]}, compiling what is missing."""
    work.mkdir(parents=True, exist_ok=True)
    plan = {}
    for prec, src in SOURCES.items():
        compiled = {"compiled (onnx, prepacked)": (work / f"{prec}-onnx", []),
                    "compiled (onnx, no prepack)": (work / f"{prec}-onnx-noprepack", ["--no-prepack"]),
                    "compiled (ORT format)": (work / f"{prec}-ort", ["--format", "ort"])}
        for out, options in compiled.values():
            if not out.exists():
                cli("compile", str(src), str(out), *options)
        bundle = work / f"{prec}.edgellama"
        if not bundle.exists():
            cli("pack", str(work / f"{prec}-onnx"), str(bundle))
        py = [sys.executable, "-c", CHILD]
        plan[prec] = [("uncompiled", py, src)] + [(name, py, out) for name, (out, _) in compiled.items()]
        if baseline is not None:
            plan[prec].insert(1, ("uncompiled, baseline runtime", [*_shim_env(work, baseline), *py], src))
        plan[prec].append(("bundle of compiled (verified)", py, bundle))
        if GENAI_PYTHON.exists() and GENAI[prec].exists():
            plan[prec].append(("onnxruntime-genai", [str(GENAI_PYTHON), str(HERE / "peers" / "decode_peer.py"),
                                                     "--child-ttft", "--system", "genai", "--threads", "2",
                                                     "--model"], GENAI[prec]))
    return plan


def _shim_env(work: Path, checkout: Path) -> list[str]:
    """`env PYTHONPATH=<dir>` where <dir>/edgellama is `checkout`: that checkout's package
    shadows the installed one in the child."""
    shim = work / "baseline-shim"
    shim.mkdir(parents=True, exist_ok=True)
    link = shim / "edgellama"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(Path(checkout).resolve(), target_is_directory=True)
    return ["env", f"PYTHONPATH={shim}"]


def one(cmd: list[str], path: Path) -> dict:
    args = cmd + [str(path)] + ([json.dumps(PROMPT_IDS)] if "-c" in cmd else [])
    wait_quiet(max_wait_s=float(os.environ.get("CPULOAD_MAX_WAIT_S", "20")))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    with ForeignLoad() as fl:
        t = time.time()
        p = subprocess.run(args, capture_output=True, text=True)
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgellama-cold"))
    ap.add_argument("--json", type=Path, default=None, help="Also write every run here.")
    ap.add_argument("--baseline", type=Path, default=None, help="Another checkout's runtime, on the uncompiled folder.")
    ap.add_argument("--only", choices=sorted(SOURCES), default=None, help="One precision only.")
    args = ap.parse_args()
    plan = prepare(args.work, args.baseline)
    if args.only:
        plan = {args.only: plan[args.only]}
    results: dict[str, dict[str, list[dict]]] = {p: {name: [] for name, _, _ in v} for p, v in plan.items()}
    for prec, variants in plan.items():
        for name, cmd, path in variants:  # warm the page cache: every variant reads from memory
            one(cmd, path)
        for i in range(args.runs):
            for name, cmd, path in variants:
                results[prec][name].append(one(cmd, path))
            print(f"{prec}: round {i + 1}/{args.runs} done", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(plan, results))


def table(plan, results) -> str:
    med = lambda runs, k: statistics.median(r[k] for r in runs) if all(k in r for r in runs) else None  # noqa: E731
    lines = ["| model | variant | cold first token s | vs uncompiled | CPU s | session s | load s | peak RSS MB "
             "| size MB | foreign CPUs |", "|---|---|---|---|---|---|---|---|---|---|"]
    for prec, variants in plan.items():
        base = med(results[prec]["uncompiled"], "ttft_s")
        for name, _, path in variants:
            runs = results[prec][name]
            ttft, sess = med(runs, "ttft_s"), med(runs, "session_s")
            lines.append(f"| {prec} | {name} | {ttft:.3f} | {base / ttft:.2f}× | {med(runs, 'cpu_s'):.3f} | "
                         f"{'-' if sess is None else f'{sess:.3f}'} | {med(runs, 'load_s'):.3f} | "
                         f"{med(runs, 'peak_rss_mb'):.0f} | {size_mb(path):.0f} | {med(runs, 'foreign_cpus'):.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
