"""Steadiness under long and concurrent use, measured (benchmarks/soak.py, tests/test_reliability.py).

long_generation  one generation as long as asked (EOS ignored), RSS sampled every `every` tokens
load_cycles      load a model, generate a few tokens, drop it: RSS after each cycle
run_threads      many generations on one shared Model from N threads started together

RSS is read from /proc (Linux); elsewhere the functions return None for it. The KV cache
is preallocated but its pages are touched only as tokens arrive, so over a long generation
RSS grows by the KV bytes written and nothing else: `Sample.rss - Sample.kv_bytes` is the
figure that should stay flat.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from edgellama.runtime.model import Model
from edgellama.runtime.prompt_cache import kv_bytes_per_token


def rss_bytes() -> int | None:
    """This process's resident set size now, or None where /proc is not there."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True)
class Sample:
    tokens: int  # generated so far
    seconds: float  # since the generation started (prefill included)
    rss: int | None  # bytes
    kv_bytes: int  # KV cache bytes holding the prompt and the tokens so far


def long_generation(model: Model, prompt: str | Sequence[int], tokens: int, every: int = 256,
                    **sampling) -> tuple[list[Sample], str]:
    """Generate `tokens` tokens (fewer if the context ends first); samples every `every`
    tokens and at the end; returns (samples, text)."""
    gen = model.generate(prompt, max_new_tokens=tokens, ignore_eos=True, **sampling)
    per_token, start = kv_bytes_per_token(model), time.perf_counter()

    def sample(n: int) -> Sample:
        return Sample(n, time.perf_counter() - start, rss_bytes(), (gen.prompt_tokens + n) * per_token)

    samples = [sample(0)]
    for step in gen:
        if step.token_id is not None and gen.completion_tokens % every == 0:
            samples.append(sample(gen.completion_tokens))
    if samples[-1].tokens != gen.completion_tokens:
        samples.append(sample(gen.completion_tokens))
    return samples, gen.text


def load_cycles(folder: str | Path, cycles: int, **load_options) -> list[int | None]:
    """RSS after each of `cycles` rounds of load -> generate 4 tokens -> drop."""
    out = []
    for _ in range(cycles):
        model = Model.load(folder, **load_options)
        model.generate_text("Hello", max_new_tokens=4)
        del model
        gc.collect()
        out.append(rss_bytes())
    return out


def slope(values: Sequence[float]) -> float:
    """Least-squares growth per step of a series."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    num = sum((i - mean_x) * (v - mean_y) for i, v in enumerate(values))
    return num / sum((i - mean_x) ** 2 for i in range(n))


def run_threads(model: Model, jobs: Sequence[dict], threads: int) -> list[str]:
    """Texts of `jobs` (generate_text keyword arguments, "prompt" included), run by `threads`
    threads that start together, job i on thread i % threads; in job order."""
    results: list[str | None] = [None] * len(jobs)
    errors: list[BaseException] = []
    barrier = threading.Barrier(threads)

    def work(first: int) -> None:
        try:
            barrier.wait()
            for i in range(first, len(jobs), threads):
                job = dict(jobs[i])
                results[i] = model.generate_text(job.pop("prompt"), **job)
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    if errors:
        raise errors[0]
    return results
