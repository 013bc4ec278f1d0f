#!/usr/bin/env python3
"""Time the peer exporters on the float SmolLM2 copy: wall time and peak RSS.

Each export runs under GNU ``/usr/bin/time -v`` (Debian package ``time``;
``apt-get update && apt-get install -y time`` if missing) and is reported as
"Elapsed (wall clock)" and "Maximum resident set size" (the largest process of the
run).  Each export first waits for a quiet machine and records the CPU use of other
processes while it ran (``foreign_cpus``, see cpuload.py).  Stdlib only: run it with
any python.

    python export_peers.py                      # all three, 1 repeat
    python export_peers.py --only genai-int4 --repeats 3

Exports (outputs under --out, each folder wiped first):
    optimum-fp32  optimum-cli export onnx --model F32 --task text-generation-with-past OUT
    genai-fp32    python -m onnxruntime_genai.models.builder -i F32 -o OUT -p fp32 -e cpu
    genai-int4    python -m onnxruntime_genai.models.builder -i F32 -o OUT -p int4 -e cpu

The JSON summary goes to --json (merged under key "export") and to stdout.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cpuload import ForeignLoad, wait_quiet  # noqa: E402

PEERS = "/work/peers"


def commands(f32, out, peers):
    genai = [f"{peers}/genai/bin/python", "-m", "onnxruntime_genai.models.builder",
             "-i", f32, "-e", "cpu", "-c", f"{peers}/cache_dir"]
    return {
        "optimum-fp32": [f"{peers}/optimum/bin/optimum-cli", "export", "onnx", "--model", f32,
                         "--task", "text-generation-with-past", f"{out}/optimum-fp32"],
        "genai-fp32": genai + ["-o", f"{out}/genai-fp32", "-p", "fp32"],
        "genai-int4": genai + ["-o", f"{out}/genai-int4", "-p", "int4"],
    }


def parse_time_v(text):
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (\S+)", text).group(1)
    secs = 0.0
    for part in wall.split(":"):
        secs = secs * 60 + float(part)
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    user = float(re.search(r"User time \(seconds\): (\S+)", text).group(1))
    sys_ = float(re.search(r"System time \(seconds\): (\S+)", text).group(1))
    return {"wall_s": secs, "peak_rss_mb": rss_kb / 1024, "user_s": user, "sys_s": sys_}


def dir_size_mb(path):
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total / 1e6


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--f32", default="/work/models/smollm2-f32")
    ap.add_argument("--out", default=f"{PEERS}/out")
    ap.add_argument("--peers", default=PEERS, help="folder holding the peer venvs")
    ap.add_argument("--only", nargs="*", help="subset of optimum-fp32 genai-fp32 genai-int4")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--json", default=f"{PEERS}/results.json")
    args = ap.parse_args()

    if not os.path.exists("/usr/bin/time"):
        sys.exit("GNU time missing: apt-get update && apt-get install -y time")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmds = commands(args.f32, args.out, args.peers)
    names = args.only or list(cmds)
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name in names:
        cmd = cmds[name]
        runs = []
        for r in range(args.repeats):
            target = f"{args.out}/{name}"
            shutil.rmtree(target, ignore_errors=True)
            shutil.rmtree(f"{args.peers}/cache_dir", ignore_errors=True)
            log = f"{args.out}/{name}.log"
            print(f"[{name} run {r + 1}] {' '.join(cmd)}", file=sys.stderr, flush=True)
            wait_quiet(log=lambda m: print(m, file=sys.stderr))
            with open(log, "w") as lf, ForeignLoad() as fl:
                p = subprocess.run(["/usr/bin/time", "-v"] + cmd, stdout=lf,
                                   stderr=subprocess.STDOUT, env=env, cwd=args.peers)
            text = open(log).read()
            if p.returncode != 0:
                print(text[-3000:], file=sys.stderr)
                sys.exit(f"{name} failed with exit code {p.returncode}; see {log}")
            m = parse_time_v(text)
            m["out_mb"] = round(dir_size_mb(target), 1)
            m["foreign_cpus"] = round(fl.cpus, 3)
            runs.append(m)
            print(f"  {m}", file=sys.stderr, flush=True)
        results[name] = {
            "command": " ".join(cmd),
            "wall_s": round(statistics.median(x["wall_s"] for x in runs), 2),
            "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in runs), 1),
            "best_wall_s": round(min(x["wall_s"] for x in runs), 2),
            "out_mb": runs[-1]["out_mb"],
            "runs": runs,
        }

    doc = {}
    if os.path.exists(args.json):
        with open(args.json) as f:
            doc = json.load(f)
    doc.setdefault("export", {}).update(results)
    doc["export_measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
