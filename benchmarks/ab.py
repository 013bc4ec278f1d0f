#!/usr/bin/env python3
"""A/B: decode and prefill tok/s of the same model folder(s) under two checkouts of edgellama.

    git worktree add /tmp/base main                  # the code to compare against
    HF_HUB_OFFLINE=1 python benchmarks/ab.py --base /tmp/base --head . --model MODEL_DIR
    git worktree remove /tmp/base

Each side runs in a fresh process per round, under this same interpreter (--python), with
PYTHONPATH mapping its checkout as `edgellama` (benchmarks/checkout.py): the sides differ
only in edgellama's code, not in onnxruntime, numpy, tokenizers or the model folder. The
process is peers/decode_peer.py --system edgellama, which uses the public API only
(`Model.load(folder, threads=N)`, `model.generate(ids, max_new_tokens=N, ignore_eos=True)`):
after a warm-up, --runs greedy generations of --new-tokens tokens from a 9-token prompt
(decode tok/s, prefill excluded) and --runs forwards over 512 GPL-3 tokens (prefill tok/s);
medians of the runs. Each timed run first waits up to --max-wait seconds for other
processes to leave the CPUs (peers/cpuload.py).

Rounds alternate the order (base, head; head, base; ...), so a machine whose speed drifts
weighs on both sides alike. Per model: each side's median over the rounds, and head/base as
the median of the per-round ratios with their min and max. --base and --head may be the
same checkout: the spread of that A/A run is the noise floor of the machine.

Writes AB.md and ab.json to --out (default benchmarks/results), replacing the last ones.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import checkout
import host
import layout

DECODE = Path(__file__).resolve().parent / "peers" / "decode_peer.py"
METRICS = {"decode_tok_s": "decode tok/s", "prefill_512_tok_s": "prefill-512 tok/s"}


@dataclass(frozen=True)
class Side:
    name: str            # base or head
    checkout: Path
    env: dict            # os.environ with this checkout as `edgellama`


def make_side(name: str, path: Path, shims: Path, args: argparse.Namespace) -> tuple[Side, dict]:
    """The side and what it is: commit, modified, the module file its child imports."""
    env = checkout.checkout_env(path, shims)
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", CPULOAD_MAX_WAIT_S=str(args.max_wait))
    info = checkout.describe(path)
    info["imports"] = checkout.check_import(path, env, args.python)
    return Side(name, Path(path).resolve(), env), info


def measure(side: Side, model: Path, args: argparse.Namespace) -> dict:
    """One fresh process of `side` on `model`: median decode and prefill tok/s of --runs."""
    cmd = [args.python, str(DECODE), "--system", "edgellama", "--model", str(model), "--threads", str(args.threads),
           "--runs", str(args.runs), "--cold-runs", "0", "--new-tokens", str(args.new_tokens)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=side.env)
    if p.returncode != 0:
        raise SystemExit(f"{side.name} ({side.checkout}) on {model} failed:\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout)
    foreign = r["runs"]["foreign_cpus"]
    return {**{k: r[k] for k in METRICS}, "first32_ids": r["first32_ids"],
            "foreign_cpus": round(max(foreign["decode"] + foreign["prefill_512"]), 3)}


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


def ab_model(model: Path, sides: list[Side], args: argparse.Namespace) -> dict:
    rounds = []
    for r in range(args.rounds):
        got = {s.name: measure(s, model, args) for s in (sides if r % 2 == 0 else sides[::-1])}
        rounds.append({"order": list(got), **got})
        print(f"{model.name} round {r + 1}/{args.rounds}: decode base {got['base']['decode_tok_s']:.1f}, "
              f"head {got['head']['decode_tok_s']:.1f} tok/s; prefill-512 base "
              f"{got['base']['prefill_512_tok_s']:.0f}, head {got['head']['prefill_512_tok_s']:.0f}",
              file=sys.stderr, flush=True)
    out = {side: {k: round(statistics.median(r[side][k] for r in rounds), 2) for k in METRICS}
           for side in ("base", "head")}
    out["ratio"] = {k: spread([r["head"][k] / r["base"][k] for r in rounds]) for k in METRICS}
    out["same_greedy_tokens"] = all(r["head"]["first32_ids"] == r["base"]["first32_ids"] for r in rounds)
    out["max_foreign_cpus"] = max(r[s]["foreign_cpus"] for r in rounds for s in ("base", "head"))
    out["rounds"] = rounds
    return out


def onnxruntime_version(python: str) -> str:
    p = subprocess.run([python, "-c", "import onnxruntime; print(onnxruntime.__version__)"],
                       capture_output=True, text=True)
    return p.stdout.strip() or "?"


def report(doc: dict) -> str:
    s = doc["settings"]
    side = lambda d: (f"`{d['path']}` at {(d['commit'] or '?')[:10]}"  # noqa: E731
                      + (" with uncommitted changes" if d["modified"] else ""))
    L = ["# A/B: head against base checkout of edgellama", "",
         "Written by `benchmarks/ab.py` from [ab.json](ab.json); `python benchmarks/ab.py --help` gives the "
         "method. A later run replaces this file.", "",
         f"Machine: {host.describe(doc['machine'])}; onnxruntime {doc['onnxruntime']}, {s['threads']} threads. "
         f"Measured {doc['measured_at']}.", "",
         f"- base: {side(doc['base'])}", f"- head: {side(doc['head'])}",
         f"- command: `{doc['command']}`", "",
         f"{s['rounds']} rounds, order alternating, one fresh process per side per round; in each, medians of "
         f"{s['runs']} runs: decode = {s['new_tokens']} greedy tokens after a 9-token prompt, prefill excluded; "
         "prefill = one forward over 512 tokens. Ratio = median of the per-round head/base ratios (min–max).", "",
         "| model | decode base | decode head | head/base | prefill-512 base | prefill-512 head | head/base "
         "| same greedy tokens | max foreign CPUs |",
         "|---|---|---|---|---|---|---|---|---|"]
    for name, m in doc["models"].items():
        cells = []
        for k in METRICS:
            q = m["ratio"][k]
            cells += [f"{m['base'][k]:,.1f}", f"{m['head'][k]:,.1f}",
                      f"{q['median']:.3f} ({q['min']:.3f}–{q['max']:.3f})"]
        L.append(f"| {name} | {' | '.join(cells)} | {'yes' if m['same_greedy_tokens'] else 'no'} "
                 f"| {m['max_foreign_cpus']:.2f} |")
    return "\n".join(L) + "\n"


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the checkout to compare against")
    ap.add_argument("--head", type=Path, default=layout.REPO, help="the checkout under test (default: this one)")
    ap.add_argument("--model", type=Path, action="append", required=True,
                    help="a model folder both checkouts can load (repeatable)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per model, order alternating (default 6)")
    ap.add_argument("--runs", type=int, default=3, help="timed runs per process, median (default 3)")
    ap.add_argument("--new-tokens", type=int, default=128, help="tokens per decode run (default 128)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=10.0,
                    help="seconds each timed run waits for other processes to go quiet (default 10)")
    ap.add_argument("--python", default=sys.executable, help="interpreter for both sides (default: this one)")
    ap.add_argument("--out", type=Path, default=layout.RESULTS, help="folder for AB.md and ab.json (default: benchmarks/results)")
    args = ap.parse_args()
    if args.rounds < 1 or args.runs < 1 or args.new_tokens < 2:
        ap.error("--rounds and --runs must be at least 1, --new-tokens at least 2")
    for m in args.model:
        if not m.is_dir():
            ap.error(f"--model {m}: not a folder")
    return args


def main() -> None:
    args = parse_args()
    doc = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": host.machine(),
           "onnxruntime": onnxruntime_version(args.python),
           "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
           "settings": {k: getattr(args, k) for k in ("rounds", "runs", "new_tokens", "threads", "max_wait")}}
    with tempfile.TemporaryDirectory(prefix="edgellama-ab-") as shims:
        base, doc["base"] = make_side("base", args.base, Path(shims), args)
        head, doc["head"] = make_side("head", args.head, Path(shims), args)
        doc["models"] = {str(m): ab_model(m.resolve(), [base, head], args) for m in args.model}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "ab.json").write_text(json.dumps(doc, indent=2) + "\n")
    text = report(doc)
    (args.out / "AB.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
