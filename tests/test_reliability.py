"""Steady under long and concurrent use: RSS over a long generation and over load/unload
cycles, and one model shared by 4 threads. The full-size measurement on SmolLM2 is
benchmarks/soak.py; these are cheaper versions that still fail on a leak. (SmolLM2 on 4
threads: tests/test_runtime.py::test_four_threads_share_one_model.)"""

from __future__ import annotations

import gc
import statistics
import threading
import weakref

import pytest

from edgellama.exporter.export import ExportOptions, export
from edgellama.runtime.model import Model
from edgellama.tools.soak import load_cycles, long_generation, rss_bytes, run_threads, slope

MB = 2**20
pytestmark = pytest.mark.skipif(rss_bytes() is None, reason="RSS is read from /proc (Linux)")


@pytest.fixture(scope="module")
def long_context(tmp_path_factory):
    """A tiny model with a 4096-token context, exported with both KV layouts."""
    from conftest import make_tiny

    base = tmp_path_factory.mktemp("long")
    make_tiny(base / "hf", max_position_embeddings=4096)
    export(base / "hf", base / "shared")
    export(base / "hf", base / "concat", ExportOptions(attention="standard"))
    return base


def _excess_after_warmup(samples) -> int:
    """RSS growth from the 500th token to the end, less the KV bytes written meanwhile."""
    first, last = samples[1], samples[-1]
    assert first.tokens == 500
    return (last.rss - first.rss) - (last.kv_bytes - first.kv_bytes)


_LONG_CHILD = r"""
import json, sys
from edgellama.runtime.model import Model
from edgellama.tools.soak import long_generation
model = Model.load(sys.argv[1], threads=1)
prompt = model.encode("the quick brown fox")
out = {"shared_kv": model.kv_layout.value == "shared", "prompt": len(prompt)}
for name, seed in (("first", 0), ("second", 1)):
    samples, text = long_generation(model, prompt, 5000, every=500, temperature=0.8, seed=seed)
    out[name] = [[s.tokens, s.seconds, s.rss, s.kv_bytes] for s in samples]
    out[name + "_chars"] = len(text)
print(json.dumps(out))
"""


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_long_generation_rss_flat(long_context, layout):
    """Sampled generations to the end of the context (4,096 tokens), twice. After 500 tokens
    RSS grows by the KV bytes written and nothing more: from the first generation on with the
    shared KV buffer (every decode step has the same shapes); from the second with the concat
    layout, whose onnxruntime arena and per-length memory plans reach their high-water mark
    during the first. Measured in a fresh process: the test process's RSS also moves with
    whatever earlier tests left in its heap (one-off steps of 3-9 MB seen in full-suite runs)."""
    import json
    import subprocess
    import sys

    from edgellama.tools.soak import Sample

    run = subprocess.run([sys.executable, "-c", _LONG_CHILD, str(long_context / layout)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    first, second = ([Sample(*s) for s in out[k]] for k in ("first", "second"))
    assert out["shared_kv"] == (layout == "shared")
    assert first[-1].tokens == 4096 - out["prompt"]  # as long as the context allows
    if layout == "shared":
        assert _excess_after_warmup(first) < 1.5 * MB, [(s.tokens, s.rss / MB) for s in first]
    assert out["second_chars"] > 4000
    assert _excess_after_warmup(second) < 1.5 * MB, [(s.tokens, s.rss / MB) for s in second]


def test_load_unload_50_times_does_not_grow(tiny_factory, tmp_path):
    """A model of ~3.5 MB loaded, used and dropped 50 times: leaking its weights or its
    session even once every few cycles would show. A dropped Model is freed by reference
    counting alone (no cycles left for the garbage collector)."""
    folder, _ = tiny_factory(hidden_size=128, intermediate_size=256, vocab_size=2048)
    export(folder, tmp_path / "m")
    model = Model.load(tmp_path / "m", threads=2)
    model.generate_text("Hello", max_new_tokens=4)
    refs = weakref.ref(model), weakref.ref(model.session)
    gc.disable()
    try:
        del model
        assert refs[0]() is None and refs[1]() is None
    finally:
        gc.enable()
    gc.freeze()  # torch is loaded in this process: keep load_cycles' full collections cheap
    try:
        rss = load_cycles(tmp_path / "m", 50, threads=2)
    finally:
        gc.unfreeze()
    early, late = statistics.median(rss[10:20]), statistics.median(rss[-10:])  # medians: glibc's heap steps
    assert late - early < 2 * MB, [round(r / MB, 1) for r in rss]
    assert slope(rss[10:]) < 64 * 1024, [round(r / MB, 1) for r in rss]


def _jobs(prompts, tokens: int) -> list[dict]:
    greedy = [dict(prompt=p, max_new_tokens=tokens) for p in prompts]
    seeded = [dict(prompt=p, max_new_tokens=tokens, temperature=0.9, top_p=0.95, top_k=50, seed=7 + i)
              for i, p in enumerate(prompts)]
    return greedy + seeded


@pytest.mark.parametrize("layout", ["shared", "concat"])
def test_four_threads_equal_sequential_tiny(long_context, layout):
    """Both KV layouts, 16 generations (greedy and seeded sampling, different lengths of
    prompt) on 4 threads that start together, three rounds."""
    model = Model.load(long_context / layout, threads=1)
    prompts = ["the quick", "brown fox jumps over", "def f(x): return x * 2", "The lazy dog. " * 20]
    jobs = _jobs(prompts, 48) * 2
    sequential = [model.generate_text(**dict(j)) for j in jobs]
    assert len(set(sequential)) > 4  # the jobs really differ
    for _ in range(3):
        assert run_threads(model, jobs, 4) == sequential


def test_chat_sessions_in_threads(long_context):
    """Each thread holds its own chat session (KV cache kept across turns) on one model."""
    model = Model.load(long_context / "shared", threads=1)
    turns = ["the quick", "brown fox", "jumps over"]

    def converse(seed: int) -> list[str]:
        chat = model.chat(max_new_tokens=24, temperature=0.8, seed=seed)
        return [chat.send(t) for t in turns]

    sequential = [converse(s) for s in range(4)]
    results: dict[int, list[str]] = {}
    barrier = threading.Barrier(4)

    def work(seed: int) -> None:
        barrier.wait()
        results[seed] = converse(seed)

    pool = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert [results[s] for s in range(4)] == sequential
