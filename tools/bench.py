"""`edgellama bench`: prefill and decode speed, time to first token, memory, size.

Each run: a prompt of `prompt_tokens` ids (a fixed text, repeated), greedy decoding of
`new_tokens` more with EOS ignored. Decode tok/s excludes the prefill. "cold" time to
first token is measured in a fresh process, from its start to the first token (model
load included); "warm" is prefill + first token on an already loaded model. With cold
runs, model load time and peak RSS come from those fresh processes (load + first token).
"""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from edgellama.runtime.errors import BadArgumentError
from edgellama.runtime.model import Model
from edgellama.runtime.session import default_threads

_TEXT = ("The history of computing is a story of machines that learned to do more with less: "
         "smaller transistors, lower power, and programs that fit where none fit before. ")


@dataclass(frozen=True)
class Stat:
    median: float
    min: float
    max: float

    @classmethod
    def of(cls, values: list[float]) -> "Stat":
        return cls(statistics.median(values), min(values), max(values))


@dataclass(frozen=True)
class BenchResult:
    model: str
    provider: str
    threads: int  # onnxruntime intra-op threads, as the session was built
    prompt_tokens: int
    new_tokens: int
    runs: int
    load_s: Stat
    prefill_tok_s: Stat
    decode_tok_s: Stat
    ttft_warm_s: Stat
    ttft_cold_s: Stat | None
    peak_rss_mb: float
    size_mb: float
    speculate: str | None = None  # "ngram" | "draft" | None (plain decoding)
    speculation: dict | None = None  # summed over the timed runs: forwards, drafted, accepted, tokens_per_forward

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def prompt_ids(model: Model, n: int) -> list[int]:
    ids: list[int] = []
    while len(ids) < n:
        ids += model.encode(_TEXT, add_special_tokens=False)
    return ids[:n]


def _one_run(model: Model, ids: list[int], new_tokens: int, options: dict) -> tuple[float, float, float, dict]:
    """(prefill tok/s, decode tok/s, warm time to first token s, speculation counts)."""
    gen = model.generate(ids, max_new_tokens=new_tokens, ignore_eos=True, **options)
    start = time.perf_counter()
    steps = iter(gen)
    next(steps)
    first = time.perf_counter()
    count = sum(1 for s in steps if s.token_id is not None)
    end = time.perf_counter()
    return len(ids) / (first - start), count / (end - first), first - start, gen.speculation.to_dict()


def cold_start(folder: Path, provider: str, threads: int | None, n_prompt: int) -> tuple[float, float, float]:
    """In a fresh interpreter: (process start -> first token s, model load s, peak RSS MiB)."""
    code = ("import sys,time,resource;t=float(sys.argv[1]);from edgellama.runtime.model import Model;"
            "from edgellama.tools.bench import prompt_ids;l=time.time();"
            "m=Model.load(sys.argv[2],provider=sys.argv[3],threads=int(sys.argv[4]) or None);l=time.time()-l;"
            "g=m.generate(prompt_ids(m,int(sys.argv[5])),max_new_tokens=1,ignore_eos=True);next(iter(g));"
            "print(time.time()-t,l,resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1024)")
    out = subprocess.run([sys.executable, "-c", code, repr(time.time()), str(folder), provider,
                          str(threads or 0), str(n_prompt)], capture_output=True, text=True, check=True)
    ttft, load, rss = map(float, out.stdout.strip().splitlines()[-1].split())
    return ttft, load, rss


def folder_size_mb(folder: Path) -> float:
    """A model folder's files, or a bundle file's size."""
    folder = Path(folder)
    files = [folder] if folder.is_file() else [p for p in folder.iterdir() if p.is_file()]
    return sum(p.stat().st_size for p in files) / 2**20


def bench(folder: Path, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3,
          provider: str = "cpu", threads: int | None = None, cold: bool = True,
          progress: Callable[[int, int, str], None] = lambda d, t, w: None, *,
          prompt_text: str | None = None, speculate=None, draft_tokens: int = 8) -> BenchResult:
    """prompt_text: the prompt (encoded as is) instead of prompt_tokens of filler text;
    speculate / draft_tokens: as Model.generate takes them."""
    if prompt_tokens < 1 or new_tokens < 2 or runs < 1:
        raise BadArgumentError("need --prompt-tokens >= 1, --new-tokens >= 2 and --runs >= 1")
    t = time.perf_counter()
    model = Model.load(folder, provider=provider, threads=threads)
    loads = [time.perf_counter() - t]
    ids = model.encode(prompt_text) if prompt_text is not None else prompt_ids(model, prompt_tokens)
    if not ids:
        raise BadArgumentError("the prompt file holds no text; give a file with the prompt in it")
    prompt_tokens = len(ids)
    options = {"speculate": speculate, "draft_tokens": draft_tokens}
    _one_run(model, ids[:8], 4, options)  # warm-up: first-run allocations and kernel selection
    results = []
    for i in range(runs):
        results.append(_one_run(model, ids, new_tokens, options))
        progress(i + 1, runs, "runs")
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # this process: load + runs
    colds = []
    if cold:  # fresh processes give load time and peak RSS without this process's history
        for i in range(runs):
            colds.append(cold_start(folder, provider, threads, prompt_tokens))
            progress(i + 1, runs, "cold starts")
        loads, rss = [c[1] for c in colds], max(c[2] for c in colds)
    return BenchResult(
        model=str(folder), provider=provider, threads=threads or default_threads(), prompt_tokens=prompt_tokens,
        new_tokens=new_tokens, runs=runs, load_s=Stat.of(loads),
        prefill_tok_s=Stat.of([r[0] for r in results]), decode_tok_s=Stat.of([r[1] for r in results]),
        ttft_warm_s=Stat.of([r[2] for r in results]), ttft_cold_s=Stat.of([c[0] for c in colds]) if colds else None,
        peak_rss_mb=rss, size_mb=folder_size_mb(folder),
        speculate=_speculate_name(speculate), speculation=_summed([r[3] for r in results]) if speculate else None,
    )


def _speculate_name(speculate) -> str | None:
    return speculate if isinstance(speculate, str) or speculate is None else type(speculate).__name__.lower()


def _summed(counts: list[dict]) -> dict:
    total = {k: sum(c[k] for c in counts) for k in ("forwards", "drafted", "accepted")}
    emitted = sum(c["tokens_per_forward"] * c["forwards"] for c in counts)
    total["tokens_per_forward"] = round(emitted / total["forwards"], 3) if total["forwards"] else 0.0
    return total


def format_result(r: BenchResult) -> str:
    def row(name: str, s: Stat | None, unit: str, fmt: str = "{:.2f}") -> str:
        if s is None:
            return f"{name:24s} -"
        return f"{name:24s} {fmt.format(s.median)} {unit}  (min {fmt.format(s.min)}, max {fmt.format(s.max)})"

    return "\n".join([
        f"{r.model}: {r.provider}, threads={r.threads}, {r.prompt_tokens} prompt + "
        f"{r.new_tokens} new tokens, median of {r.runs}",
        row("prefill", r.prefill_tok_s, "tok/s", "{:.1f}"),
        row("decode", r.decode_tok_s, "tok/s", "{:.1f}"),
        row("first token (warm)", r.ttft_warm_s, "s", "{:.3f}"),
        row("first token (cold)", r.ttft_cold_s, "s", "{:.3f}"),
        row("model load", r.load_s, "s", "{:.3f}"),
        f"{'peak RSS':24s} {r.peak_rss_mb:.0f} MiB",
        f"{'size on disk':24s} {r.size_mb:.1f} MiB",
    ] + ([f"{'speculation':24s} {r.speculate}: {s['tokens_per_forward']:.2f} tokens per forward, "
          f"{s['accepted']} of {s['drafted']} drafts accepted"] if (s := r.speculation) else []))
