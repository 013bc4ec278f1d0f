"""`edgellama serve`: the real SmolLM2 behind a server on a free loopback port, driven by
the real `openai` client. Expected texts come from the library's own generate on the
same model, so the server must map every field exactly as the runtime reads it."""

from __future__ import annotations

import asyncio
import http.client
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from click.testing import CliRunner  # noqa: E402

from conftest import PROMPT_IDS  # noqa: E402
from edgellama.cli import main  # noqa: E402
from edgellama.runtime.generate import Step  # noqa: E402
from edgellama.runtime.model import Model, make_config  # noqa: E402
from edgellama.runtime.prompt_cache import PromptCache, kv_bytes_per_token  # noqa: E402
from edgellama.serve.engine import Engine  # noqa: E402
from edgellama.serve.protocol import Done  # noqa: E402
from edgellama.serve.server import Server, bind  # noqa: E402

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
PROMPT = "The best thing about AI is its ability to"
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
COUNTING = "1, 2, 3, 4, 5, 6,"  # continues for a long time: a generation to interrupt
SLOTS = 2


@pytest.fixture(scope="module")
def model(smollm2_onnx) -> Model:
    return Model.load(smollm2_onnx, threads=2)


@pytest.fixture(scope="module")
def server(model):
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=SLOTS, log_level="warning").start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def raw(server, method: str, path: str, body: bytes | None = None, timeout: float = 60) -> tuple[int, dict]:
    """A raw request, for what the openai client will not send."""
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def greedy(model: Model, prompt, **options):
    gen = model.generate(prompt, temperature=0.0, **options)
    for _ in gen:
        pass
    return gen


def wait_idle(server, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (stats := server.engine.stats())["running"] or stats["queued"]:
        assert time.monotonic() < deadline, f"jobs still busy: {stats}"
        time.sleep(0.02)
    return stats


# --- what the client sees ---------------------------------------------------------------


@pytest.mark.slow
def test_models_and_health(client, server, smollm2_onnx):
    assert [m.id for m in client.models.list().data] == [smollm2_onnx.name] == [server.model_id]
    assert client.models.retrieve(server.model_id).context_length == 8192
    status, health = raw(server, "GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["max_concurrent"] == SLOTS


@pytest.mark.slow
def test_chat_completion(client, server, model):
    r = client.chat.completions.create(model=server.model_id, messages=FRANCE, temperature=0, max_tokens=40)
    gen = greedy(model, model.render_chat(FRANCE), max_new_tokens=40)
    assert r.choices[0].message.content == gen.text == "The capital of France is Paris."
    assert r.choices[0].message.role == "assistant" and r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == server.model_id
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (gen.prompt_tokens, gen.completion_tokens)
    assert r.usage.prompt_tokens == len(model.render_chat(FRANCE)) > len(model.encode(FRANCE[0]["content"]))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@pytest.mark.slow
def test_streamed_chat_joins_to_the_same_text(client, server):
    messages = [{"role": "system", "content": "You are terse."},
                {"role": "user", "content": [{"type": "text", "text": "Name three colors."}]}]
    kw = dict(model=server.model_id, messages=messages, temperature=0, max_tokens=12)
    whole = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content and len(text) > 10
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == whole.choices[0].finish_reason == "length" and set(finishes[:-1]) == {None}
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and (usage.prompt_tokens, usage.completion_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens)
    # the same request again: the prompt cache held all of it but the token whose logits are needed
    assert usage.prompt_tokens_details.cached_tokens == usage.prompt_tokens - 1
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].object == "chat.completion.chunk"


@pytest.mark.slow
def test_completion(client, server, model):
    r = client.completions.create(model=server.model_id, prompt=PROMPT, temperature=0, max_tokens=6)
    assert r.choices[0].text == greedy(model, PROMPT, max_new_tokens=6).text
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT_IDS), 6)
    by_ids = client.completions.create(model=server.model_id, prompt=PROMPT_IDS, temperature=0, max_tokens=6)
    assert by_ids.choices[0].text == r.choices[0].text
    streamed = client.completions.create(model=server.model_id, prompt=PROMPT, temperature=0, max_tokens=6,
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text


@pytest.mark.slow
def test_stop_strings(client, server, model):
    full = greedy(model, PROMPT, max_new_tokens=12).text
    stop = full.split()[3]  # a word a few tokens in
    kw = dict(model=server.model_id, prompt=PROMPT, temperature=0, max_tokens=12)
    for stops in (stop, [stop, "never appears"]):
        r = client.completions.create(**kw, stop=stops)
        assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
        streamed = client.completions.create(**kw, stop=stops, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == r.choices[0].text
    chat = client.chat.completions.create(model=server.model_id, messages=FRANCE, temperature=0, stop=" Paris",
                                          max_tokens=12)
    assert chat.choices[0].message.content == "The capital of France is"
    assert chat.choices[0].finish_reason == "stop"


@pytest.mark.slow
@pytest.mark.parametrize("fields", [
    dict(temperature=0.8, seed=7),
    dict(temperature=1.0, top_p=0.9, seed=3),
    dict(temperature=0.0, presence_penalty=1.5, frequency_penalty=0.5),
])
def test_sampling_fields_map_to_the_runtime(client, server, model, fields):
    r = client.completions.create(model=server.model_id, prompt=PROMPT, max_tokens=8, **fields)
    assert r.choices[0].text == model.generate_text(PROMPT, max_new_tokens=8, **fields)


@pytest.mark.slow
def test_logprobs_are_the_show_probs_distribution(client, server, model):
    gen = greedy(model, PROMPT, max_new_tokens=3, show_probs=5)
    r = client.completions.create(model=server.model_id, prompt=PROMPT, temperature=0, max_tokens=3, logprobs=5)
    lp = r.choices[0].logprobs
    assert lp.tokens == [model.tokenizer.decode([t]) for t in gen.completion_ids]
    shown = {model.tokenizer.decode([t]): math.log(p) for t, p in gen.prompt_top}  # what --show-probs 5 prints
    # rel 1e-5: with the prompt cache the prompt may be fed in two runs, which rounds differently
    assert lp.top_logprobs[0] == pytest.approx(shown, rel=1e-5)
    assert lp.token_logprobs[0] == pytest.approx(max(shown.values()), rel=1e-5)  # greedy: the most likely
    assert lp.text_offset == [0, len(lp.tokens[0]), len(lp.tokens[0]) + len(lp.tokens[1])]

    chat = client.chat.completions.create(model=server.model_id, messages=FRANCE, temperature=0, max_tokens=5,
                                          logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens == 5
    assert "".join(e.token for e in content) == chat.choices[0].message.content
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and e.bytes == list(e.token.encode())
    sampled = client.chat.completions.create(model=server.model_id, messages=FRANCE, temperature=1.5, seed=1,
                                             max_tokens=8, logprobs=True)  # top_logprobs 0: chosen token only
    steps = [s for s in model.generate(model.render_chat(FRANCE), temperature=1.5, seed=1, max_new_tokens=8,
                                       show_probs=1) if s.token_id is not None]
    assert any(s.token_id != s.top[0][0] for s in steps)  # some chosen tokens were not the most likely
    assert [e.logprob for e in sampled.choices[0].logprobs.content] == pytest.approx([math.log(s.prob) for s in steps], rel=1e-4)
    assert all(e.top_logprobs == [] for e in sampled.choices[0].logprobs.content)
    streamed = client.chat.completions.create(model=server.model_id, messages=FRANCE, temperature=0, max_tokens=5,
                                              logprobs=True, top_logprobs=2, stream=True)
    entries = [e for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, [t.token for t in e.top_logprobs]) for e in entries] == \
        [(e.token, [t.token for t in e.top_logprobs]) for e in content]
    assert [e.logprob for e in entries] == pytest.approx([e.logprob for e in content], rel=1e-4)  # cached prefix


# --- errors -------------------------------------------------------------------------------


BAD_CHAT = [  # (fields over a valid chat request, status, param, code)
    (dict(model="gpt-4o"), 404, "model", "model_not_found"),
    (dict(max_tokens=9000), 400, "max_tokens", "context_length_exceeded"),
    (dict(messages=[{"role": "user", "content": "hi " * 9000}]), 400, "messages", "context_length_exceeded"),
    (dict(temperature=-0.5), 400, "temperature", "invalid_value"),
    (dict(temperature=2.5), 400, "temperature", "invalid_value"),
    (dict(top_p=0), 400, "top_p", "invalid_value"),
    (dict(presence_penalty="high"), 400, "presence_penalty", "invalid_type"),
    (dict(frequency_penalty=3), 400, "frequency_penalty", "invalid_value"),
    (dict(max_tokens=0), 400, "max_tokens", "invalid_value"),
    (dict(max_completion_tokens=1.5), 400, "max_completion_tokens", "invalid_type"),
    (dict(seed=-1), 400, "seed", "invalid_value"),
    (dict(stop=["ok", ""]), 400, "stop", "invalid_value"),
    (dict(top_logprobs=3), 400, "top_logprobs", "invalid_value"),
    (dict(logprobs=True, top_logprobs=50), 400, "top_logprobs", "invalid_value"),
    (dict(n=2), 400, "n", "unsupported_parameter"),
    (dict(messages=[]), 400, "messages", "invalid_value"),
    (dict(messages=[{"role": "tool", "content": "42"}]), 400, "messages[0].tool_call_id", "missing_required_parameter"),
    (dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     400, "messages[0].content", "invalid_value"),
]


@pytest.mark.slow
@pytest.mark.parametrize("fields,status,param,code", BAD_CHAT)
def test_bad_chat_requests(client, server, fields, status, param, code):
    with pytest.raises(openai.APIStatusError) as info:
        client.chat.completions.create(**{"model": server.model_id, "messages": FRANCE, **fields})
    err = info.value
    assert err.status_code == status
    assert (err.body["type"], err.body["param"], err.body["code"]) == ("invalid_request_error", param, code)
    assert err.body["message"] and "\n" not in err.body["message"]


@pytest.mark.slow
def test_bad_completion_requests(client, server):
    too_long = client.with_options(max_retries=0).completions
    with pytest.raises(openai.BadRequestError) as info:
        too_long.create(model=server.model_id, prompt="hi " * 9000)
    assert info.value.body["code"] == "context_length_exceeded" and "8192" in info.value.body["message"]
    with pytest.raises(openai.BadRequestError) as info:
        too_long.create(model=server.model_id, prompt=[1, 2, 10**9])
    assert info.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as info:
        too_long.create(model=server.model_id, prompt=["two", "prompts"])
    assert "one prompt" in info.value.body["message"]


@pytest.mark.slow
@pytest.mark.parametrize("method,path,body,status", [
    ("POST", "/v1/chat/completions", b'{"messages": [', 400),
    ("POST", "/v1/completions", b"[1, 2]", 400),
    ("POST", "/v1/completions", b"\xff\xfe", 400),
    ("POST", "/v1/completions", b" " * (16 * 2**20 + 1), 413),
    ("GET", "/v1/chat/completions", None, 405),
    ("GET", "/v2/models", None, 404),
    ("GET", "/v1/models/other", None, 404),
])
def test_bad_http_requests(server, method, path, body, status):
    got, answer = raw(server, method, path, body)
    assert got == status
    assert set(answer["error"]) == {"message", "type", "param", "code"}


# --- concurrency --------------------------------------------------------------------------


@pytest.mark.slow
def test_concurrent_requests_equal_sequential(client, server):
    prompts = [PROMPT, "def fibonacci(n):", "Once upon a time", "Water boils at", "My favourite fruit is"]

    def complete(i: int) -> str:
        kw = dict(model=server.model_id, prompt=prompts[i], max_tokens=6, temperature=0.7, seed=i)
        if i % 2:  # half of them streamed
            return "".join(c.choices[0].text for c in client.completions.create(**kw, stream=True))
        return client.completions.create(**kw).choices[0].text

    sequential = [complete(i) for i in range(len(prompts))]
    assert len(set(sequential)) == len(prompts)
    peak_running = 0
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(complete, i) for i in range(len(prompts))]
        while not all(f.done() for f in futures):
            peak_running = max(peak_running, server.engine.stats()["running"])
            time.sleep(0.002)
        concurrent = [f.result() for f in futures]
    assert concurrent == sequential
    # Sampled, so only a bound that a missed moment cannot break; that the rest wait in the
    # queue: test_engine_runs_at_most_n_then_the_oldest_waiting.
    assert peak_running <= SLOTS


@pytest.mark.slow
def test_disconnect_frees_the_slot(client, server):
    before = wait_idle(server)
    kw = dict(model=server.model_id, prompt=COUNTING, max_tokens=4000, temperature=0, stream=True)
    streams = [client.completions.create(**kw) for _ in range(SLOTS)]  # every slot taken
    for s in streams:
        next(iter(s))
    queued = client.completions.create(**kw)  # headers come back at once; the job waits for a slot
    assert server.engine.stats()["queued"] == 1
    queued.close()
    for s in streams:
        s.close()
    after = wait_idle(server)
    assert after["cancelled"] - before["cancelled"] == SLOTS + 1 and after["finished"] == before["finished"]
    r = client.completions.create(model=server.model_id, prompt=PROMPT, temperature=0, max_tokens=2)
    assert r.choices[0].finish_reason == "length"

    with pytest.raises(TimeoutError):  # a non-streaming client that gives up also frees its slot
        raw(server, "POST", "/v1/completions", json.dumps({**kw, "stream": False}).encode(), timeout=1.0)
    assert wait_idle(server)["cancelled"] == after["cancelled"] + 1


@pytest.mark.slow
def test_shutdown_ends_open_streams_with_an_error(model):
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning").start()
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = iter(c.completions.create(model=srv.model_id, prompt=COUNTING, max_tokens=4000, temperature=0,
                                       stream=True))
    next(stream)
    stopper = threading.Thread(target=srv.stop)
    stopper.start()
    with pytest.raises(openai.APIError, match="shutting down"):  # an error event, then [DONE]
        for _ in stream:
            pass
    stopper.join()
    assert srv.engine.stats()["cancelled"] == 1


# --- the engine alone: a stand-in model whose generations wait at a gate ---------------------


class _GatedModel:
    """Stands in for Model in the Engine. Generation n (prompt [n]) records its start, yields
    STEPS[0], waits until gates[n] is set, then yields STEPS[1]."""

    def __init__(self):
        self.started: list[int] = []
        self.gates = defaultdict(threading.Event)

    def generate(self, prompt_ids, config):
        return _GatedGeneration(self, prompt_ids[0])


class _GatedGeneration:
    finish_reason, prompt_tokens, completion_tokens = "length", 1, 2

    def __init__(self, model: _GatedModel, n: int):
        self.model, self.n = model, n

    def __iter__(self):
        self.model.started.append(self.n)
        yield STEPS[0]
        assert self.model.gates[self.n].wait(60)
        yield STEPS[1]


STEPS = [Step(7, "a"), Step(8, "b")]
DONE = Done("length", 1, 2)


async def _until(condition, what: str) -> None:
    deadline = time.monotonic() + 30  # only guards against a hang
    while not condition():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.001)


def _with_engine(slots: int, scenario) -> None:
    """Runs `await scenario(model, engine)` on an event loop, as the server does."""
    async def main():
        model = _GatedModel()
        engine = Engine(model, max_concurrent=slots)
        try:
            await scenario(model, engine)
        finally:
            for gate in list(model.gates.values()):
                gate.set()
            engine.close()

    asyncio.run(main())


def _counts(engine: Engine) -> dict:
    stats = engine.stats()
    del stats["max_concurrent"]
    return stats


def test_engine_runs_at_most_n_then_the_oldest_waiting():
    async def scenario(model, engine):
        jobs = [engine.submit([n], make_config()) for n in range(4)]
        await _until(lambda: len(model.started) == 2, "two jobs should start")
        assert sorted(model.started) == [0, 1]
        assert _counts(engine) == dict(queued=2, running=2, finished=0, cancelled=0, failed=0)
        model.gates[0].set()  # job 0 ends: its worker takes the job that has waited longest
        await _until(lambda: len(model.started) == 3, "a third job should start")
        assert model.started[2] == 2
        assert _counts(engine) == dict(queued=1, running=2, finished=1, cancelled=0, failed=0)
        for n in (1, 2, 3):
            model.gates[n].set()
        for job in jobs:
            assert [e async for e in job.events()] == [*STEPS, DONE]
        assert model.started[3] == 3
        await _until(lambda: engine.stats()["finished"] == 4, "counted once the worker is done")

    _with_engine(2, scenario)


def test_engine_cancels_a_queued_job_unstarted_and_a_running_one_before_its_next_token():
    async def scenario(model, engine):
        running, queued = engine.submit([0], make_config()), engine.submit([1], make_config())
        events = running.events()
        assert await anext(events) == STEPS[0]  # generation 0 now waits at its gate
        queued.cancel()
        running.cancel()
        model.gates[0].set()  # generation 0 yields its next token: the engine must drop it
        await _until(lambda: engine.stats()["running"] == 0, "the cancelled job should end")
        marker = Done("marker", 0, 0)
        running.put(marker)  # lands after anything the worker put before it ended
        assert [e async for e in events] == [marker]
        assert model.started == [0]
        assert _counts(engine) == dict(queued=0, running=0, finished=0, cancelled=2, failed=0)

    _with_engine(1, scenario)


# --- a tiny random model behind the server: the HTTP layer without the real model's cost ------


@pytest.fixture(scope="module")
def tiny_served(tmp_path_factory):
    from conftest import make_tiny
    from edgellama.exporter.export import export

    base = tmp_path_factory.mktemp("tiny-serve")
    make_tiny(base / "hf")
    export(base / "hf", base / "onnx")
    tiny = Model.load(base / "onnx", threads=1)
    srv = Server(tiny, bind("127.0.0.1", 0), max_concurrent=SLOTS, log_level="warning").start()
    yield srv, tiny
    srv.stop()


def test_tiny_model_served_as_the_runtime_generates(tiny_served):
    srv, tiny = tiny_served
    c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "The quick brown fox"}]
    r = c.chat.completions.create(model=srv.model_id, messages=messages, temperature=0, max_tokens=8)
    gen = greedy(tiny, tiny.render_chat(messages), max_new_tokens=8)
    assert r.choices[0].message.content == gen.text and r.choices[0].finish_reason == gen.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (gen.prompt_tokens, gen.completion_tokens)
    kw = dict(model=srv.model_id, prompt="The quick", max_tokens=8, temperature=0.8, seed=3)
    whole = c.completions.create(**kw).choices[0].text
    assert whole == tiny.generate_text("The quick", max_new_tokens=8, temperature=0.8, seed=3)
    assert "".join(ch.choices[0].text for ch in c.completions.create(**kw, stream=True)) == whole


def test_speculating_server_answers_as_the_plain_runtime(tiny_served):
    from edgellama.runtime.speculate import Draft

    _, tiny = tiny_served
    srv = Server(tiny, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning",
                 speculation={"speculate": Draft(tiny), "draft_tokens": 4}).start()
    try:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.completions.create(model=srv.model_id, prompt="The quick brown fox", max_tokens=12, temperature=0)
        assert r.choices[0].text == greedy(tiny, "The quick brown fox", max_new_tokens=12).text
    finally:
        srv.stop()


# --- the command --------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_command_end_to_end(smollm2_onnx):
    proc = subprocess.Popen([sys.executable, "-m", "edgellama.cli", "serve", str(smollm2_onnx), "--port", "0",
                             "--threads", "1", "--max-concurrent", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        url = re.search(r"serving \S+ at (http://127\.0\.0\.1:\d+)/v1 \(1 at a time", line)
        assert url, line
        c = openai.OpenAI(base_url=url[1] + "/v1", api_key="unused", max_retries=0, timeout=60)
        r = c.chat.completions.create(model=smollm2_onnx.name, messages=FRANCE, temperature=0, max_tokens=8)
        assert r.choices[0].message.content.startswith("The capital of France")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)


def test_serve_reports_a_taken_port_in_one_line(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = CliRunner().invoke(main, ["serve", str(tmp_path / "unused"), "--port", str(port)])
    assert r.exit_code == 1
    assert r.output.strip() == (f"error: port {port} on 127.0.0.1 is already in use; stop what holds it "
                                "or choose another --port")


def test_serve_without_the_extra_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # import uvicorn -> ImportError
    r = CliRunner().invoke(main, ["serve", str(tmp_path)])
    assert r.exit_code == 1
    assert r.output.strip() == ("error: serve needs uvicorn, which this install lacks: "
                                "pip install 'starlette>=0.37' 'uvicorn>=0.30'")


def test_the_runtime_does_not_import_the_server():
    code = "import sys, edgellama.runtime.model, edgellama.runtime.generate; " \
           "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'edgellama')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "starlette" not in out and "uvicorn" not in out and "edgellama.serve" not in out


def test_step_prob_is_the_chosen_tokens_probability():
    import numpy as np

    from edgellama.runtime.sampling import softmax, token_prob, top_probs

    logits = np.random.default_rng(0).normal(size=500).astype(np.float32)
    probs = softmax(logits.astype(np.float64))
    top = top_probs(logits, 3)
    for token in (top[0][0], top[2][0], int(np.argmin(logits))):  # in the top list, and far outside it
        assert token_prob(logits, token, top) == pytest.approx(probs[token], rel=1e-12)


# --- the prompt cache: a server that reuses cached prefixes answers as a cold one does ------


@pytest.fixture(scope="module")
def tiny_cold(tiny_served):
    _, tiny = tiny_served
    srv = Server(tiny, bind("127.0.0.1", 0), max_concurrent=SLOTS, log_level="warning", cache_bytes=0).start()
    yield srv
    srv.stop()


def _client(srv):
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)


TINY_SYSTEM = {"role": "system", "content": "You are the quick brown fox. You jump over the lazy dog. def f(x):"}


def _ask(srv, messages, **kw) -> tuple[str, int]:
    """(the reply, usage.prompt_tokens_details.cached_tokens)"""
    r = _client(srv).chat.completions.create(model=srv.model_id, messages=messages,
                                             **{"temperature": 0, "max_tokens": 8, **kw})
    return r.choices[0].message.content, r.usage.prompt_tokens_details.cached_tokens


def test_prompt_cache_answers_as_a_cold_server(tiny_served, tiny_cold):
    hot, tiny = tiny_served
    assert hot.engine.cache is not None and tiny_cold.engine.cache is None
    first = [TINY_SYSTEM, {"role": "user", "content": "The quick brown fox"}]
    reply, _ = _ask(tiny_cold, first)
    assert _ask(hot, first)[0] == reply
    second = first + [{"role": "assistant", "content": reply}, {"role": "user", "content": "jumps over"}]
    reply2, cached = _ask(hot, second, temperature=0.8, seed=2)  # the next turn: reused
    assert (reply2, 0) == _ask(tiny_cold, second, temperature=0.8, seed=2)
    assert cached >= len(tiny.render_chat(first))
    other = [TINY_SYSTEM, {"role": "user", "content": "return x * 2"}]  # the same system prompt: partly reused
    reply3, cached = _ask(hot, other)
    assert reply3 == _ask(tiny_cold, other)[0] and len(tiny.render_chat([TINY_SYSTEM], False)) // 2 < cached
    kw = dict(model=hot.model_id, messages=other, temperature=0, max_tokens=8, stream=True,
              stream_options={"include_usage": True})
    chunks = list(_client(hot).chat.completions.create(**kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply3
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == len(tiny.render_chat(other)) - 1
    ids = tiny.render_chat(other)  # completions share the cache: the same ids, found again
    r = _client(hot).completions.create(model=hot.model_id, prompt=ids, temperature=0, max_tokens=8)
    assert r.choices[0].text == reply3 and r.usage.prompt_tokens_details.cached_tokens == len(ids) - 1
    status, health = raw(hot, "GET", "/health")
    assert health["prompt_cache"]["entries"] >= 1 and health["prompt_cache"]["hits"] >= 3


def test_evicted_prefixes_answer_as_a_cold_server(tiny_served, tiny_cold):
    _, tiny = tiny_served
    a = [{"role": "user", "content": "The quick brown fox"}]
    b = [{"role": "user", "content": "def f(x): return x"}]
    room = len(tiny.render_chat(b)) + 8 + 4  # b's cache (prompt + max_tokens) and a little, not a's too
    srv = Server(tiny, bind("127.0.0.1", 0), max_concurrent=1, log_level="warning",
                 cache_bytes=room * (kv_bytes_per_token(tiny) + 16)).start()
    try:
        reply_a, _ = _ask(srv, a)
        _ask(srv, b)  # evicts a's
        a2 = a + [{"role": "assistant", "content": reply_a}, {"role": "user", "content": "lazy dog"}]
        reply, cached = _ask(srv, a2)
        assert reply == _ask(tiny_cold, a2)[0] and cached < len(tiny.render_chat(a))
        assert srv.engine.cache.stats()["evicted"] >= 1
    finally:
        srv.stop()


def test_concurrent_requests_sharing_a_prefix_answer_as_sequential_cold_ones(tiny_served, tiny_cold):
    hot, _ = tiny_served
    users = ["The quick brown fox", "def f(x):", "return x * 2", "lazy dog", "jumps over", "The quick"]
    conversations = [[TINY_SYSTEM, {"role": "user", "content": u}] for u in users]

    def ask(srv, i: int) -> str:
        return _ask(srv, conversations[i % len(users)], temperature=0.7, seed=i, max_tokens=12)[0]

    expected = [ask(tiny_cold, i) for i in range(2 * len(users))]
    with ThreadPoolExecutor(2 * len(users)) as pool:  # each prompt twice at once, SLOTS running
        assert list(pool.map(lambda i: ask(hot, i), range(2 * len(users)))) == expected
        assert list(pool.map(lambda i: ask(hot, i), range(2 * len(users)))) == expected  # all cached now


def test_a_cancelled_generation_goes_back_to_the_cache_consistent(tiny_served, monkeypatch):
    from edgellama.serve import engine as engine_module

    _, tiny = tiny_served
    sent, real_put = [], engine_module.Job.put

    def put(job, item):  # the client goes away after the third token
        real_put(job, item)
        sent.append(item)
        if len(sent) == 3:
            job.cancel()

    monkeypatch.setattr(engine_module.Job, "put", put)
    prompt = tiny.encode("The quick brown fox")
    cache = PromptCache(tiny, 2**20)

    async def scenario():
        engine = Engine(tiny, 1, cache)
        try:
            engine.submit(prompt, make_config(max_new_tokens=50, temperature=0, ignore_eos=True))
            await _until(lambda: engine.stats()["cancelled"] == 1, "the job should be cancelled")
        finally:
            engine.close()

    asyncio.run(scenario())
    monkeypatch.undo()
    generated = [s.token_id for s in sent]
    assert len(generated) == 3 and len(cache) == 1
    decoder = cache.decoder_for(prompt + generated + [5])  # extends all it holds: taken whole
    assert list(decoder.tokens) == prompt + generated  # what was sent, and nothing half-fed
    cache.store(decoder)
    more = prompt + generated[:2] + [7]
    gen = cache.generate(more, max_new_tokens=8, temperature=0, ignore_eos=True)
    for _ in gen:
        pass
    assert gen.completion_ids == greedy(tiny, more, max_new_tokens=8, ignore_eos=True).completion_ids


@pytest.mark.slow
def test_chat_turns_reuse_the_prompt_cache_and_answer_as_cold(client, server, model):
    first = [{"role": "system", "content": "You are a geography teacher. Answer in one short sentence."}, *FRANCE]
    kw = dict(model=server.model_id, temperature=0, max_tokens=24)
    r1 = client.chat.completions.create(messages=first, **kw)
    assert r1.choices[0].message.content == greedy(model, model.render_chat(first), max_new_tokens=24).text
    second = first + [{"role": "assistant", "content": r1.choices[0].message.content},
                      {"role": "user", "content": "And of Italy?"}]
    r2 = client.chat.completions.create(messages=second, **kw)
    assert r2.choices[0].message.content == greedy(model, model.render_chat(second), max_new_tokens=24).text
    assert r2.usage.prompt_tokens_details.cached_tokens >= len(model.render_chat(first))
    other = [first[0], {"role": "user", "content": "What is the capital of Spain?"}]  # the system prompt, reused
    r3 = client.chat.completions.create(messages=other, **kw)
    assert r3.choices[0].message.content == greedy(model, model.render_chat(other), max_new_tokens=24).text
    assert r3.usage.prompt_tokens_details.cached_tokens >= len(model.render_chat(first[:1], False)) - 2
