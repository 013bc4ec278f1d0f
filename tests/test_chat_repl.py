"""The chat REPL (tools/chat_repl.py) and what it stands on: ChatSession fitting a long
conversation into a small context, keeping a stopped reply, save/load; Generation.timings.

Most tests drive run_repl over StringIO; two run it in a child on a pseudo-terminal, where
Ctrl-C is the terminal's own SIGINT and readline is live."""

from __future__ import annotations

import io
import json
import os
import re
import select
import sys
import time

import pytest

from conftest import tiny_model_of_layout
from edgellama.runtime.contract import KVLayout
from edgellama.runtime.errors import BadArgumentError, ContextOverflowError
from edgellama.tools.chat_repl import format_timings, run_repl

CONTEXT = 64


@pytest.fixture(scope="module", params=[KVLayout.SHARED, KVLayout.CONCAT], ids=lambda k: k.value)
def any_layout(request, tmp_path_factory):
    """The 64-token-context tiny model, on each KV layout."""
    return tiny_model_of_layout(tmp_path_factory, request.param, max_position_embeddings=CONTEXT)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The 64-token-context tiny model (GroupQueryAttention: the shared KV layout)."""
    return tiny_model_of_layout(tmp_path_factory, KVLayout.SHARED, max_position_embeddings=CONTEXT)


def repl(session, script: str, stats: bool = False) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    run_repl(session, stdin=io.StringIO(script), out=out, err=err, stats=stats)
    return out.getvalue(), err.getvalue()


# ---- timings ----------------------------------------------------------------------------------

def test_timings(tiny):
    chat = tiny.chat(max_new_tokens=8, ignore_eos=True)
    gen = chat.stream("the quick brown fox")
    assert not gen.started and gen.timings.generated_tokens == 0
    steps = iter(gen)
    next(steps)
    partial = gen.timings
    assert partial.generated_tokens == 1 and partial.decoded_tokens == 0 and partial.prefill_seconds > 0
    list(steps)
    t = gen.timings
    assert (t.prompt_tokens, t.cached_tokens, t.prefilled_tokens) == (gen.prompt_tokens, 0, gen.prompt_tokens)
    assert t.generated_tokens == gen.completion_tokens == 8 and t.decoded_tokens == 7
    assert 0 < t.prefill_seconds <= t.first_token_seconds and t.decode_seconds > 0
    assert t.prefill_tokens_per_s == pytest.approx(t.prefilled_tokens / t.prefill_seconds)
    assert t.decode_tokens_per_s == pytest.approx(7 / t.decode_seconds)
    assert re.fullmatch(r"prompt \d+ tokens [\d.]+ tok/s · 8 tokens [\d.]+ tok/s · first token \d+\.\d\d s",
                        format_timings(gen))

    second = chat.stream("jumps over")  # the first turn is in the cache
    list(second)
    t2 = second.timings
    assert 0 < t2.cached_tokens < t2.prompt_tokens and t2.prefilled_tokens == t2.prompt_tokens - t2.cached_tokens
    assert f"prompt {t2.prompt_tokens} tokens ({t2.cached_tokens} cached) " in format_timings(t2)
    assert t2.to_dict()["prefilled_tokens"] == t2.prefilled_tokens


def test_timings_of_an_empty_reply(tiny):
    gen = tiny.generate("the quick", max_new_tokens=4, stop_token_ids=list(range(tiny.vocab_size)))
    list(gen)
    assert gen.finish_reason == "eos" and gen.completion_tokens == 0
    t = gen.timings
    assert t.generated_tokens == 0 and t.decoded_tokens == 0 and t.decode_tokens_per_s is None
    assert " · 0 tokens · first token " in format_timings(gen)


# ---- the session: a full context, a stopped reply, save/load -------------------------------------

def test_ten_turns_in_a_64_token_context(tiny):
    chat = tiny.chat(system="be brief", max_new_tokens=16)
    script = "".join(f"question number {i}?\n" for i in range(10))
    out, err = repl(chat, script)
    assert "error" not in err
    assert len(out.split("\n")) == 11  # ten replies, each ended by a newline
    assert err.count("no longer fits the model's 64-token context") == 1
    assert chat.dropped_turns > 0
    users = [m["content"] for m in chat.messages if m["role"] == "user"]
    assert users == [f"question number {i}?" for i in range(10)]  # the whole conversation is kept
    assert chat.messages[0] == {"role": "system", "content": "be brief"}


def test_the_latest_turns_are_what_the_model_sees(tiny):
    """After dropping, the prompt is the system prompt and the newest whole turns, and it
    leaves reply_room free."""
    chat = tiny.chat(system="be brief", max_new_tokens=16)
    for i in range(6):
        chat.send(f"question number {i}?")
    gen = chat.stream("last one")
    list(gen)
    seen = chat.messages[:1] + chat.messages[1 + chat._start:-1]  # the window, up to the new reply
    assert chat.dropped_turns > 0 and seen[1]["role"] == "user" and seen[-1]["content"] == "last one"
    assert gen.prompt_ids == tiny.render_chat(seen)
    assert gen.prompt_tokens + chat.reply_room <= CONTEXT
    assert chat.reply_room == 16


def test_a_message_too_long_for_the_context(tiny):
    chat = tiny.chat(max_new_tokens=8)
    chat.send("hello")
    before = list(chat.messages)
    with pytest.raises(ContextOverflowError, match=r"this message is \d+ tokens but the model's context is 64; "
                                                   "shorten it"):
        chat.stream("the quick brown fox " * 20)
    assert chat.messages == before  # nothing changed
    out, err = repl(chat, "the quick brown fox " * 20 + "\nhello again\n")
    assert err.startswith("error: this message is") and len(err.splitlines()[0]) < 120
    assert chat.messages[-2]["content"] == "hello again"


def test_a_reply_cut_by_the_context_end(tiny):
    chat = tiny.chat(max_new_tokens=1000, ignore_eos=True)
    out, err = repl(chat, "hello\n")
    assert "(reply cut: it reached the end of the model's 64-token context)" in err
    out, err = repl(tiny.chat(max_new_tokens=5, ignore_eos=True), "hello\n")
    assert "(reply cut at max_new_tokens = 5;" in err


def _fresh_reply(model, messages, text):
    other = model.chat(max_new_tokens=12, ignore_eos=True)
    other.messages = messages
    return other.send(text)


def test_a_stopped_reply_is_kept_and_the_cache_stays_right(any_layout):
    model = any_layout
    chat = model.chat(max_new_tokens=12, ignore_eos=True)
    chat.send("hello")
    gen = chat.stream("tell me more")
    steps = iter(gen)
    shown = "".join(next(steps).text for _ in range(4))
    chat.interrupt(gen)  # the caller stopped reading
    assert gen.finish_reason == "interrupted" and gen.consistent
    assert chat.messages[-1] == {"role": "assistant", "content": shown}
    history = list(chat.messages)
    # The next turn reuses the cache as it was left; it equals a fresh session fed the history.
    assert chat.send("and then?") == _fresh_reply(model, history, "and then?")


def test_ctrl_c_inside_a_forward(any_layout, monkeypatch):
    """KeyboardInterrupt raised inside a step: the reply so far is kept, the half-updated
    decoder is dropped, and the next turn is right."""
    model = any_layout
    chat = model.chat(max_new_tokens=12, ignore_eos=True)
    chat.send("hello")
    gen = chat.stream("tell me more")
    calls = []

    def decode_one(token):
        calls.append(token)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return type(chat._decoder).decode_one(chat._decoder, token)

    monkeypatch.setattr(chat._decoder, "decode_one", decode_one)
    with pytest.raises(KeyboardInterrupt):
        for _ in gen:
            pass
    assert gen.finish_reason == "interrupted" and not gen.consistent and chat._decoder is None
    assert chat.messages[-1] == {"role": "assistant", "content": gen.text} and gen.completion_tokens == 3
    history = list(chat.messages)
    assert chat.send("and then?") == _fresh_reply(model, history, "and then?")


def test_an_abandoned_stream_is_kept_at_the_next_turn(tiny):
    chat = tiny.chat(max_new_tokens=12, ignore_eos=True)
    gen = chat.stream("hello")
    next(iter(gen))
    chat.send("again")
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "user", "assistant"]
    assert chat.messages[1]["content"] == gen.text
    unstarted = chat.stream("never read")
    chat.send("third")  # a stream never started leaves no trace
    assert "never read" not in [m["content"] for m in chat.messages] and unstarted.finish_reason is None


def test_save_and_load(tiny, tmp_path):
    chat = tiny.chat(system="be brief", max_new_tokens=6)
    chat.send("hello")
    chat.save(tmp_path / "c.json")
    saved = json.loads((tmp_path / "c.json").read_text())
    assert saved == chat.messages and len(saved) == 3
    other = tiny.chat(max_new_tokens=6)
    other.load(tmp_path / "c.json")
    assert other.messages == saved and other.system == "be brief"
    kept = tiny.chat(system="mine", max_new_tokens=6)
    kept.messages = saved[1:]  # no system message: the session's own stays
    assert kept.messages[0] == {"role": "system", "content": "mine"}


@pytest.mark.parametrize("text, error", [
    ("[{", r"c.json: not valid JSON \(.*line 1 column 3\); give a file written by /save"),
    ('{"role": "user"}', r"c.json: expected a JSON list of messages, got an object"),
    ('["hi"]', r"c.json: message 1 is text; give"),
    ('[{"role": "bot", "content": "x"}]', r"c.json: message 1 has role 'bot'; use system, user or assistant"),
    ('[{"role": "user", "content": "x"}, {"role": "system", "content": "y"}]',
     r"c.json: message 2 is a system message; only the first may be"),
    ('[{"role": "user", "content": 3}]', r"c.json: message 1 has content a int; give text"),
])
def test_load_rejects_a_bad_file(tiny, tmp_path, text, error):
    (tmp_path / "c.json").write_text(text)
    chat = tiny.chat(max_new_tokens=6)
    with pytest.raises(BadArgumentError, match=error):
        chat.load(tmp_path / "c.json")
    assert chat.messages == []
    out, err = repl(chat, f"/load {tmp_path / 'c.json'}\n")
    assert err.count("\n") == 1 and err.startswith("error: ") and out == ""


def test_config_replaced_mid_chat(tiny):
    chat = tiny.chat(max_new_tokens=4, ignore_eos=True)
    chat.send("hello")
    from edgellama.tools.chat_repl import set_option
    chat.config = set_option(chat.config, "max_new_tokens", "2")
    gen = chat.stream("again")
    list(gen)
    assert gen.completion_tokens == 2


# ---- the REPL's commands ------------------------------------------------------------------------

def test_commands(tiny, tmp_path):
    chat = tiny.chat(max_new_tokens=6, ignore_eos=True)
    path = tmp_path / "chat.json"
    script = (f"hello\n/help\n/set\n/set temperature 0.7\n/set bogus 1\n/set top_k many\n/set top_p 2\n"
              f"/set seed none\n/frobnicate\n/save {path}\n"
              '"""\nfirst line\n/second line\n"""\n'
              f"/load {path}\n/set\n/load {tmp_path / 'missing.json'}\n/save\n/set top_k\n/reset\n/exit\nnever read\n")
    sent, stream = [], chat.stream
    chat.stream = lambda text, *a, **k: (sent.append(text), stream(text, *a, **k))[1]
    out, err = repl(chat, script)
    lines = err.splitlines()
    assert "commands (never sent to the model):" in lines
    assert all(any(line.lstrip().startswith(c) for line in lines) for c in ("/help", "/set", "/reset", "/save", "/load",
                                                                           "/exit"))
    assert re.search(r"^  temperature +0\.0$", err, re.M) and re.search(r"^  temperature +0\.7$", err, re.M)
    assert "(temperature = 0.7)" in lines
    assert "error: no option 'bogus'; /set takes temperature, top_k" in err
    assert "error: top_k 'many' is not an integer" in lines
    assert any(line.startswith("error: sampling: top_p 2.0 is out of range") for line in lines)
    assert "unknown command /frobnicate; /help lists the commands" in lines
    assert f"(saved 2 messages to {path})" in lines and f"(loaded 2 messages from {path})" in lines
    assert "(conversation reset)" in lines
    assert f"error: {tmp_path / 'missing.json'}: No such file or directory" in lines
    assert "error: /save FILE: give a file name" in lines
    assert "error: /set NAME VALUE, e.g. /set temperature 0.7 (/set alone shows the values)" in lines
    assert chat.config.sampling.temperature == 0.7 and chat.config.sampling.seed is None
    assert chat.messages == []  # reset, after the load put the first turn back
    saved = json.loads(path.read_text())
    assert [m["content"] for m in saved if m["role"] == "user"] == ["hello"]
    # two replies, to "hello" and to the block (one message, commands inside it included;
    # "never read" was not), each ended by a newline (sampled replies may hold newlines too)
    assert sent == ["hello", "first line\n/second line"]
    assert out.endswith("\n") and out.count("\n") >= 2
    chat2 = tiny.chat(max_new_tokens=2)
    repl(chat2, '"""\nfirst line\n/second line\n"""\n""" one line """\n')
    assert [m["content"] for m in chat2.messages if m["role"] == "user"] == ["first line\n/second line", " one line "]


def test_piped_input_has_no_prompts(tiny):
    out, err = repl(tiny.chat(max_new_tokens=3, ignore_eos=True), "hello\n\n   \nagain")
    assert ">>>" not in err and ">>>" not in out and len(out.splitlines()) == 2


def test_stats_line(tiny):
    out, err = repl(tiny.chat(max_new_tokens=3, ignore_eos=True), "hello\n", stats=True)
    assert re.search(r"^prompt \d+ tokens .* · 3 tokens [\d.]+ tok/s · first token ", err, re.M)
    out, err = repl(tiny.chat(max_new_tokens=3, ignore_eos=True), "hello\n")  # None: stderr is no terminal
    assert "tok/s" not in err


def test_an_empty_reply_is_said(tiny):
    chat = tiny.chat(max_new_tokens=3, stop_token_ids=list(range(tiny.vocab_size)))
    out, err = repl(chat, "hello\n")
    assert "(empty reply: the model ended its turn at once)" in err.splitlines()


# ---- on a terminal: Ctrl-C, readline, exit codes --------------------------------------------------

CHILD = r"""
import sys, time
from edgellama.runtime import decoder
from edgellama.runtime.model import Model
from edgellama.tools.chat_repl import run_repl

pause = float(sys.argv[2])
plain = decoder.Decoder.decode_one
def slow(self, token):  # a reply slow enough to be interrupted half-way
    time.sleep(pause)
    return plain(self, token)
decoder.Decoder.decode_one = slow
model = Model.load(sys.argv[1], threads=1)
run_repl(model.chat(max_new_tokens=1000, ignore_eos=True), stats=False)
"""


class Terminal:
    """A child on a pseudo-terminal: write keys, read what it shows."""

    def __init__(self, args, env):
        import pty

        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the terminal is its stdin, stdout, stderr and controlling tty
            try:
                os.execve(sys.executable, [sys.executable, *args], env)
            finally:
                os._exit(127)
        self.seen = self.log = b""

    def send(self, keys: bytes) -> None:
        os.write(self.fd, keys)

    def ctrl_c_at_prompt(self) -> None:
        """Ctrl-C while readline waits: after a pause, for CPython's readline loop checks for
        signals only when its select() is interrupted, and one that lands just before it
        enters select() waits for the next key (in a person's hands, a second Ctrl-C)."""
        time.sleep(0.3)
        self.send(b"\x03")

    def expect(self, what: bytes, timeout: float = 30.0) -> bytes:
        """Read until `what` shows (after what was already matched); what came before it."""
        deadline = time.monotonic() + timeout
        while what not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise AssertionError(f"{what!r} never came; the terminal shows {self.log[-600:]!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:  # EIO: the child is gone
                raise AssertionError(f"{what!r} never came; the child ended after {self.log[-600:]!r}") from None
            self.seen += chunk
            self.log += chunk
        before, _, self.seen = self.seen.partition(what)
        return before

    def exit_code(self, timeout: float = 30.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:  # drain, so the child never blocks writing
                if select.select([self.fd], [], [], 0.05)[0]:
                    os.read(self.fd, 4096)
            except OSError:
                pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        raise AssertionError("the chat did not exit")

    def alive(self) -> bool:
        return os.waitpid(self.pid, os.WNOHANG)[0] == 0


@pytest.fixture
def terminal(tiny, tmp_path):
    if sys.platform == "win32":
        pytest.skip("pseudo-terminals are POSIX")
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "TERM": "dumb", "OPENBLAS_NUM_THREADS": "1"}
    started = []

    def start(pause: float = 0.0) -> Terminal:
        term = Terminal(["-c", CHILD, str(tiny.folder), str(pause)], env)
        started.append(term)
        return term

    yield start
    for term in started:
        try:
            if term.alive():
                os.kill(term.pid, 9)
                os.waitpid(term.pid, 0)
        except ChildProcessError:
            pass


def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(terminal, tiny, tmp_path):
    term = terminal(pause=0.1)  # 100 ms a token: a full reply (~50 tokens) takes seconds
    term.expect(b">>> ")
    term.send(b"hello\r")
    term.expect(b"hello\r\n")
    time.sleep(0.6)  # some of the reply is out
    term.send(b"\x03")
    shown = term.expect(b"(interrupted)")
    term.expect(b">>> ")
    assert term.alive() and shown.strip()
    saved = tmp_path / "saved.json"
    term.send(f"/save {saved}\r".encode())
    term.expect(b"(saved 2 messages")
    term.expect(b">>> ")
    messages = json.loads(saved.read_text())
    partial = messages[1]["content"]
    full = tiny.chat(max_new_tokens=1000, ignore_eos=True).send("hello")
    assert messages[0] == {"role": "user", "content": "hello"} and messages[1]["role"] == "assistant"
    assert partial and full.startswith(partial) and len(partial) < len(full)

    term.send(b"/set max_new_tokens 3\r")
    term.expect(b"(max_new_tokens = 3)")
    term.send(b"again\r")
    term.expect(b"(reply cut at max_new_tokens = 3;")
    term.expect(b">>> ")
    term.send(b"typed, then dropped")
    term.expect(b"dropped")  # readline has it (keys sent with the Ctrl-C would be flushed by the terminal)
    term.ctrl_c_at_prompt()  # on a line with text: a fresh prompt, not the end
    term.expect(b">>> ")
    term.send(f"/save {saved}\r".encode())
    term.expect(b"(saved 4 messages")
    term.expect(b">>> ")
    term.send(b"\x04")  # Ctrl-D
    assert term.exit_code() == 0
    messages = json.loads(saved.read_text())
    assert [m["content"] for m in messages if m["role"] == "user"] == ["hello", "again"]
    assert messages[1]["content"] == partial
    assert (tmp_path / "cache" / "edgellama" / "chat_history").read_text().count("again") == 1


def test_multi_line_and_ctrl_c_at_an_empty_prompt(terminal, tmp_path):
    term = terminal()
    term.expect(b">>> ")
    term.send(b'"""\r')
    term.expect(b"... ")
    term.send(b"two\r")
    term.expect(b"... ")
    term.send(b'lines"""\r')
    term.expect(b">>> ")
    saved = tmp_path / "s.json"
    term.send(f"/save {saved}\r".encode())
    term.expect(b">>> ")
    term.ctrl_c_at_prompt()
    assert term.exit_code() == 0
    assert json.loads(saved.read_text())[0] == {"role": "user", "content": "two\nlines"}
