"""The generation loop: shared vs concatenated KV, stopping, threads, context limits."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest

from conftest import PROMPT_IDS
from edgellama.exporter.export import ExportOptions, export
from edgellama.runtime.contract import KVLayout
from edgellama.runtime.errors import BadArgumentError, ContextOverflowError
from edgellama.runtime.generate import StopStrings
from edgellama.runtime.model import Model


@pytest.fixture(scope="module")
def smol(smollm2_onnx):
    return Model.load(smollm2_onnx, threads=2)


def _ids(gen):
    return [s.token_id for s in gen if s.token_id is not None]


def test_shared_buffer_equals_concat_path(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    export(folder, tmp_path / "gqa")
    export(folder, tmp_path / "std", ExportOptions(attention="standard"))
    shared, concat = Model.load(tmp_path / "gqa"), Model.load(tmp_path / "std")
    assert (shared.kv_layout, concat.kv_layout) == (KVLayout.SHARED, KVLayout.CONCAT)
    prompt = list(range(3, 40))  # longer than one chunk would be with a small PREFILL_CHUNK
    a = _ids(shared.generate(prompt, max_new_tokens=30, ignore_eos=True))
    b = _ids(concat.generate(prompt, max_new_tokens=30, ignore_eos=True))
    assert a == b and len(a) == 30


def test_chunked_prefill_equals_one_pass(tiny_factory, tmp_path, monkeypatch):
    from edgellama.runtime import decoder

    folder, _ = tiny_factory()
    export(folder, tmp_path / "m")
    model = Model.load(tmp_path / "m")
    prompt = list(range(3, 60))
    whole = _ids(model.generate(prompt, max_new_tokens=10, ignore_eos=True))
    monkeypatch.setattr(decoder, "PREFILL_CHUNK", 7)
    assert _ids(model.generate(prompt, max_new_tokens=10, ignore_eos=True)) == whole


@pytest.mark.slow
def test_stop_string_is_not_emitted(smol):
    full = smol.generate_text(PROMPT_IDS, max_new_tokens=40)
    assert "automate" in full
    gen = smol.generate(PROMPT_IDS, max_new_tokens=40, stop=["automate"])
    text = "".join(s.text for s in gen)
    assert text == full[: full.index("automate")]
    assert gen.finish_reason == "stop"


@pytest.mark.slow
def test_length_and_eos_finish_reasons(smol):
    gen = smol.generate(PROMPT_IDS, max_new_tokens=3)
    assert len(_ids(gen)) == 3 and gen.finish_reason == "length"
    chat = smol.generate(smol.render_chat([{"role": "user", "content": "Say hi."}]), max_new_tokens=200)
    list(chat)
    assert chat.finish_reason == "eos"


@pytest.mark.slow
def test_streamed_pieces_equal_full_decode(smol):
    gen = smol.generate("Écris un poème sur la mer 🌊 et 東京:", max_new_tokens=48, temperature=0.8, seed=3)
    pieces = [s.text for s in gen]
    assert "".join(pieces) == smol.decode(gen.completion_ids)
    assert all("\ufffd" not in p for p in pieces)


@pytest.mark.slow
def test_context_overflow_is_refused_before_running(smol):
    with pytest.raises(ContextOverflowError, match="context is 8192"):
        smol.generate([504] * 8192, max_new_tokens=1)


def test_generation_clamped_to_context(tiny_factory, tmp_path):
    folder, _ = tiny_factory(max_position_embeddings=32)
    export(folder, tmp_path / "m")
    model = Model.load(tmp_path / "m")
    gen = model.generate(list(range(3, 28)), max_new_tokens=100, ignore_eos=True)
    assert len(_ids(gen)) == 32 - 25 and gen.finish_reason == "length"


@pytest.mark.slow
def test_unknown_option_and_bad_values(smol):
    with pytest.raises(BadArgumentError, match="unknown generation option"):
        smol.generate("hi", max_tokens=3)
    with pytest.raises(BadArgumentError, match="max_new_tokens"):
        smol.generate("hi", max_new_tokens=0)
    with pytest.raises(BadArgumentError, match="empty"):
        smol.generate("", max_new_tokens=2)


@pytest.mark.slow
def test_four_threads_share_one_model(smol):
    prompts = ["The capital of France is", "def fibonacci(n):", "Once upon a time", "The best thing about AI is"]
    greedy = {p: smol.generate_text(p, max_new_tokens=24) for p in prompts}
    sampled = {p: smol.generate_text(p, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11) for p in prompts}
    results: dict[str, tuple[str, str]] = {}

    def work(p: str) -> None:
        results[p] = (smol.generate_text(p, max_new_tokens=24),
                      smol.generate_text(p, max_new_tokens=24, temperature=0.9, top_p=0.95, seed=11))

    threads = [threading.Thread(target=work, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert {p: r[0] for p, r in results.items()} == greedy
    assert {p: r[1] for p, r in results.items()} == sampled


@pytest.mark.parametrize("stops, pieces, expected, hit", [
    (["END"], ["abc", "E", "N", "D", "x"], "abc", True),
    (["END"], ["abc", "EN", "x"], "abcENx", False),
    (["\n\n"], ["a\n", "\nb"], "a", True),
    ([], ["a", "b"], "ab", False),
])
def test_stop_strings_hold_back_partial_matches(stops, pieces, expected, hit):
    s = StopStrings(stops)
    out = ""
    for p in pieces:
        out += s.feed(p)
        if s.hit:
            break
    out += s.flush()
    assert out == expected and s.hit == hit


@pytest.mark.slow
def test_folder_described_by_genai_config_only(smollm2_onnx, tmp_path):
    """A folder with genai_config.json and no edgellama.json (onnxruntime-genai's layout)."""
    import shutil

    folder = tmp_path / "genai-style"
    shutil.copytree(smollm2_onnx, folder)
    (folder / "edgellama.json").unlink()
    model = Model.load(folder, threads=2)
    assert model.kv_layout is KVLayout.SHARED and model.manifest.source["format"] == "onnxruntime-genai"
    assert model.generate_text(PROMPT_IDS, max_new_tokens=12).startswith(" make things more efficient")


@pytest.mark.slow
def test_chat_cli_with_piped_stdin(smollm2_onnx):
    import subprocess
    import sys

    script = "What is 2+2?\n/reset\nName a color.\n/exit\nnever read\n"
    out = subprocess.run([sys.executable, "-m", "edgellama.cli", "chat", str(smollm2_onnx), "--max-new-tokens", "16",
                          "--threads", "2"], input=script, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    replies = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(replies) >= 2 and "(conversation reset)" in out.stderr
    model = Model.load(smollm2_onnx, threads=2)
    first = model.chat(max_new_tokens=16).send("What is 2+2?")
    assert out.stdout.startswith(first)


# ---- loading: the tokenizer waits for the session build to release the GIL ------------------
# _wait_for_session_build reads the clock through model.time. With a clock that moves only when
# the test moves it, each way out of the wait (recognized at once, unmoved for settle_s, gave up,
# build over) is a matter of what happened in which order, not of how long a sleep took.

class _Clock:
    """Stands in for model.time: monotonic() moves only when told; sleep() yields for real."""

    def __init__(self):
        self.now, self.polls = 0.0, 0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.polls += 1
        time.sleep(seconds)


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    from edgellama.runtime import model

    fake = _Clock()
    monkeypatch.setattr(model, "time", fake)
    return fake


def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 30  # only guards against a hang
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.001)


def _create_inference_session(events: list, held: threading.Lock) -> None:
    """Stands in for onnxruntime's method of that name, blocked without the GIL."""
    events.append("builder blocks")
    held.acquire(timeout=60)  # sess.initialize_session(...)
    events.append("builder resumes")


def _blocked(events: list, held: threading.Lock) -> None:
    events.append("builder blocks")
    held.acquire(timeout=60)  # some other GIL-free call
    events.append("builder resumes")


@contextmanager
def _builder(where, events: list):
    """A thread blocked in `where` (a C call, GIL released) until the block ends."""
    held = threading.Lock()
    held.acquire()
    thread = threading.Thread(target=where, args=(events, held))
    thread.start()
    try:
        _until(lambda: events, "the builder never started")
        yield thread
    finally:
        held.release()
        thread.join(60)


def _waiter(builder: threading.Thread, building: threading.Event, events: list, **kw) -> threading.Thread:
    from edgellama.runtime.model import _wait_for_session_build

    def wait() -> None:
        _wait_for_session_build(builder.ident, building, **kw)
        events.append("waiter returns")

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    return thread


def _building() -> threading.Event:
    building = threading.Event()
    building.set()
    return building


def test_wait_returns_once_the_builder_is_inside_initialize_session(clock):
    """Recognized by its source line: no settling, no giving up (the clock never moves)."""
    events = []
    with _builder(_create_inference_session, events) as builder:
        waiter = _waiter(builder, _building(), events, settle_s=1.0, give_up_s=1.0)
        waiter.join(30)
        assert not waiter.is_alive() and builder.is_alive()
    assert events == ["builder blocks", "waiter returns", "builder resumes"]
    assert clock.now == 0.0


@pytest.mark.parametrize("limits, limit", [
    (dict(settle_s=0.1, give_up_s=100.0), 0.1),  # any other GIL-free call: once unmoved for settle_s
    (dict(settle_s=100.0, give_up_s=0.3), 0.3),  # never longer than give_up_s
])
def test_wait_for_any_other_call_ends_once_the_clock_passes_its_limit(clock, limits, limit):
    events = []
    with _builder(_blocked, events) as builder:
        waiter = _waiter(builder, _building(), events, **limits)
        for now in (0.0, 0.9 * limit):
            clock.now = now
            polls = clock.polls
            _until(lambda: clock.polls >= polls + 20, "the waiter stopped polling")
            assert waiter.is_alive(), f"returned at {now} s, before {limit} s"
        clock.now = 2 * limit  # past it even if the builder's frame last moved (settle_s restarts) at 0.9 x
        waiter.join(30)
        assert not waiter.is_alive() and builder.is_alive()
    assert events == ["builder blocks", "waiter returns", "builder resumes"]


def test_wait_stops_when_the_build_is_over(clock):
    events = []
    with _builder(_blocked, events) as builder:
        building = _building()
        waiter = _waiter(builder, building, events, settle_s=100.0, give_up_s=100.0)
        _until(lambda: clock.polls >= 20, "the waiter never polled")
        assert waiter.is_alive()
        building.clear()
        waiter.join(30)
        assert not waiter.is_alive() and builder.is_alive()
        polls = clock.polls
        _waiter(builder, building, events).join(30)  # over before the wait begins: no poll at all
        assert clock.polls == polls
    assert events == ["builder blocks", "waiter returns", "waiter returns", "builder resumes"]


def test_wait_does_not_wait_for_a_thread_that_has_ended(clock):
    from edgellama.runtime.model import _wait_for_session_build

    ended = threading.Thread(target=lambda: None)
    ended.start()
    ended.join()
    # On this thread: a thread started now could be given the ended one's id.
    _wait_for_session_build(ended.ident, _building(), settle_s=100.0, give_up_s=100.0)
    assert clock.polls == 0


def test_chat_on_a_short_context_model(tiny_factory, tmp_path):
    """The chat's cache is never sized past the context (its rope tables end there), however
    many new tokens the config allows."""
    folder, _ = tiny_factory(max_position_embeddings=48)
    export(folder, tmp_path / "m")
    chat = Model.load(tmp_path / "m").chat(max_new_tokens=256, ignore_eos=True)
    gen = chat.stream("hi")
    list(gen)
    assert gen.finish_reason == "length" and gen.prompt_tokens + gen.completion_tokens == 48
