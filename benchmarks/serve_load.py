#!/usr/bin/env python3
"""A bounded load test of `edgellama serve` on loopback, through the real `openai` client.

    python benchmarks/serve_load.py MODEL_DIR [--requests 64] [--concurrency 8]
                                    [--max-concurrent 8] [--max-tokens 32] [--threads 2]

Starts `edgellama serve MODEL_DIR --port 0` as a child process (127.0.0.1 only), sends each
of a few distinct chat prompts once, one at a time (greedy, the expected answers), then
sends --requests chat completions over --concurrency client threads (each prompt several
times; every other request streamed) and checks every answer equals its prompt's
expected text: tokens of concurrent requests must never mix. Reports requests/s, latency
p50 / p95, streamed time to first token, generated tokens/s, and how many CPUs the server
and (on a shared machine) other processes used meanwhile; stops the server.
Bounded: a fixed number of requests, each with a client timeout, and a --deadline for
the whole run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import openai

TOPICS = ["the sea", "a library", "winter", "bicycles", "coffee", "mountains", "trains", "the moon"]


@dataclass
class Result:
    prompt: int
    text: str
    seconds: float
    first_token: float | None  # streamed requests only
    tokens: int


def start_server(args) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "edgellama.cli", "serve", str(args.model_dir), "--host", "127.0.0.1",
           "--port", "0", "--max-concurrent", str(args.max_concurrent), "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    if not match:
        proc.kill()
        sys.exit(f"the server did not start: {line.strip() or proc.stderr.read()}")
    return proc, match[1]


def ask(client: openai.OpenAI, model: str, i: int, stream: bool, max_tokens: int) -> Result:
    messages = [{"role": "user", "content": f"Write two sentences about {TOPICS[i]}."}]
    kw = dict(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    start = time.perf_counter()
    if not stream:
        r = client.chat.completions.create(**kw)
        return Result(i, r.choices[0].message.content, time.perf_counter() - start, None, r.usage.completion_tokens)
    pieces, first, tokens = [], None, 0
    for chunk in client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter() - start
            pieces.append(chunk.choices[0].delta.content)
    return Result(i, "".join(pieces), time.perf_counter() - start, first, tokens)


def cpu_seconds(pid: int | None = None) -> float:
    """CPU seconds used: the whole machine (busy jiffies in /proc/stat), or one process."""
    hz = os.sysconf("SC_CLK_TCK")
    if pid is None:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return (sum(v) - v[3] - v[4] - sum(v[8:10])) / hz  # less idle, iowait, guest (counted in user)
    with open(f"/proc/{pid}/stat") as f:
        v = f.read().rsplit(")", 1)[1].split()
    return (int(v[11]) + int(v[12])) / hz  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]  # nearest rank


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=8, help="client threads")
    p.add_argument("--max-concurrent", type=int, default=8, help="the server's --max-concurrent")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=2, help="the server's --threads")
    p.add_argument("--deadline", type=float, default=900, help="seconds for the whole run")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args()

    proc, url = start_server(args)
    model = args.model_dir.name
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=args.deadline / 2)
    began = time.monotonic()
    try:
        expected = [ask(client, model, i, False, args.max_tokens) for i in range(len(TOPICS))]
        jobs = [(n % len(TOPICS), n % 2 == 1) for n in range(args.requests)]
        start, machine, server, own = time.perf_counter(), cpu_seconds(), cpu_seconds(proc.pid), time.process_time()
        with ThreadPoolExecutor(args.concurrency) as pool:
            futures = [pool.submit(ask, client, model, i, stream, args.max_tokens) for i, stream in jobs]
            results, failures = [], []
            for f in futures:
                try:
                    results.append(f.result(timeout=max(1.0, args.deadline - (time.monotonic() - began))))
                except Exception as exc:  # noqa: BLE001 - counted and reported
                    failures.append(f"{type(exc).__name__}: {exc}")
        wall = time.perf_counter() - start
        server_cpu = cpu_seconds(proc.pid) - server
        other_cpus = (cpu_seconds() - machine - server_cpu - (time.process_time() - own)) / wall
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()

    mixed = sum(r.text != expected[r.prompt].text for r in results)
    latencies = [r.seconds for r in results]
    firsts = [r.first_token for r in results if r.first_token is not None]
    report = {
        "model": str(args.model_dir), "requests": args.requests, "concurrency": args.concurrency,
        "server_max_concurrent": args.max_concurrent, "server_threads": args.threads,
        "max_tokens": args.max_tokens, "cpus": os.cpu_count(),
        "succeeded": len(results), "failed": len(failures), "mixed_outputs": mixed,
        "wall_s": round(wall, 2), "requests_per_s": round(len(results) / wall, 3),
        "latency_p50_s": round(statistics.median(latencies), 3) if latencies else None,
        "latency_p95_s": round(percentile(latencies, 95), 3) if latencies else None,
        "first_token_p50_s": round(statistics.median(firsts), 3) if firsts else None,
        "generated_tokens_per_s": round(sum(r.tokens for r in results) / wall, 1),
        "sequential_latency_p50_s": round(statistics.median(r.seconds for r in expected), 3),
        "server_cpus_used": round(server_cpu / wall, 2), "other_processes_cpus": round(max(0.0, other_cpus), 2),
    }
    if args.json:
        print(json.dumps(report))
    else:
        for key, value in report.items():
            print(f"{key:26s} {value}")
        for failure in failures[:5]:
            print("failure:", failure)
    sys.exit(0 if not failures and not mixed else 1)


if __name__ == "__main__":
    main()
