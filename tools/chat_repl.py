"""The interactive loop behind `edgellama chat`: read a message, stream the reply, repeat.

    run_repl(model.chat(system=..., config=...))          # stdin / stdout / stderr

Replies go to stdout, everything else (prompts, notices, stats, errors) to stderr. On a
terminal: `>>> ` prompts, line editing and history through the stdlib readline module
(where there is one), Ctrl-C stopping a reply. Piped: one message per line, no prompts.
Commands (never sent to the model): /help lists them.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from edgellama.runtime.errors import BadArgumentError, EdgeLlamaError

if TYPE_CHECKING:
    from edgellama.runtime.generate import Generation, GenerationConfig, Timings
    from edgellama.runtime.model import ChatSession

PROMPT, MORE = ">>> ", "... "
BLOCK = '"""'
HISTORY_LENGTH = 1000

# /set NAME VALUE: the options a chat turn reads, and how a value is parsed.
SAMPLING_OPTIONS = {"temperature": float, "top_k": int, "top_p": float, "min_p": float,
                    "repetition_penalty": float, "presence_penalty": float, "frequency_penalty": float,
                    "seed": int}
OPTIONS = {**SAMPLING_OPTIONS, "max_new_tokens": int}

HELP = f"""commands (never sent to the model):
  /help                 this list
  /set                  show the generation options
  /set NAME VALUE       change one: {", ".join(list(OPTIONS)[:4])},
                        {", ".join(list(OPTIONS)[4:7])},
                        {", ".join(list(OPTIONS)[7:]).replace("seed", "seed (a number or none)")}
  /reset                forget the conversation (the system prompt stays)
  /save FILE            write the conversation as JSON
  /load FILE            go on from a conversation written by /save
  /exit, /quit, /bye    leave (Ctrl-D too, or Ctrl-C at an empty prompt)
a message of several lines (or one that starts with /): open and close it with {BLOCK}
Ctrl-C during a reply stops it; the reply stays in the conversation as far as it got"""


# ---- stats ---------------------------------------------------------------------------------

def format_timings(gen: "Generation | Timings") -> str:
    """One line: prompt tokens (cached ones) and prefill rate · reply tokens and decode rate ·
    time to first token. The prefill rate is over the tokens actually prefilled."""
    t = getattr(gen, "timings", gen)
    prompt = f"prompt {_tokens(t.prompt_tokens)}" + (f" ({t.cached_tokens} cached)" if t.cached_tokens else "")
    if t.prefill_tokens_per_s:
        prompt += f" {t.prefill_tokens_per_s:.1f} tok/s"
    reply = _tokens(t.generated_tokens) + (f" {t.decode_tokens_per_s:.1f} tok/s" if t.decode_tokens_per_s else "")
    return f"{prompt} · {reply} · first token {t.first_token_seconds:.2f} s"


def _tokens(n: int) -> str:
    return f"{n} token" + ("" if n == 1 else "s")


# ---- /set ------------------------------------------------------------------------------------

def set_option(config: "GenerationConfig", name: str, value: str) -> "GenerationConfig":
    """`config` with option `name` set from the text `value`; BadArgumentError (one line) for
    an unknown name or a value that is not the option's kind or out of its range."""
    kind = OPTIONS.get(name)
    if kind is None:
        raise BadArgumentError(f"no option {name!r}; /set takes {', '.join(OPTIONS)}")
    if name == "seed" and value.lower() in ("none", "off"):
        parsed = None
    else:
        try:
            parsed = kind(value)
        except ValueError:
            what = "an integer" + (" or none" if name == "seed" else "") if kind is int else "a number"
            raise BadArgumentError(f"{name} {value!r} is not {what}") from None
    if name in SAMPLING_OPTIONS:
        return replace(config, sampling=replace(config.sampling, **{name: parsed}))
    return replace(config, **{name: parsed})


def show_options(config: "GenerationConfig") -> str:
    values = {name: getattr(config.sampling, name) for name in SAMPLING_OPTIONS}
    values["max_new_tokens"] = config.max_new_tokens
    width = max(map(len, values))
    return "\n".join(f"  {name:<{width}}  {'none' if v is None else v}" for name, v in values.items())


# ---- input -----------------------------------------------------------------------------------

def history_file() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "edgellama" / "chat_history"


class _Reader:
    """Lines from stdin: through readline's input() on a terminal (both stdin and stdout the
    process's own terminals), else readline() with the prompt on stderr when interactive.
    read() returns None at end of input; Ctrl-C raises KeyboardInterrupt (see cleared)."""

    def __init__(self, stdin: TextIO, out: TextIO, err: TextIO):
        self.stdin, self.err = stdin, err
        self.interactive = _isatty(stdin)
        self.readline = None
        if self.interactive and stdin is sys.stdin and out is sys.stdout and _isatty(sys.stdout):
            try:
                import readline
            except ImportError:  # Windows, or a Python built without it
                readline = None
            self.readline = readline
        self._history = None
        if self.readline is not None:
            self._history = history_file()
            try:
                self.readline.read_history_file(str(self._history))
            except (OSError, UnicodeDecodeError):
                pass
            self.readline.set_history_length(HISTORY_LENGTH)

    def read(self, prompt: str) -> str | None:
        if self.readline is not None:
            try:
                return input(prompt)  # readline writes the prompt to the terminal (stdout)
            except EOFError:
                return None
        if self.interactive:
            self.err.write(prompt)
            self.err.flush()
        line = self.stdin.readline()
        return line[:-1] if line.endswith("\n") else (line or None)

    def cleared(self) -> bool:
        """After Ctrl-C at a prompt: whether the line held typed text (then the text goes
        and the prompt comes back) rather than nothing (then the chat ends). Without
        readline this cannot be told: taken as nothing."""
        if self.readline is None:
            return False
        try:
            return bool(self.readline.get_line_buffer().strip())
        except Exception:  # noqa: BLE001  (libedit and others may not keep it)
            return False

    def close(self) -> None:
        if self._history is None:
            return
        try:
            self._history.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(str(self._history))
        except OSError:
            pass


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class _CtrlC:
    """While a reply streams: the first Ctrl-C only sets `hit` (the loop stops after the
    step in hand, so the KV cache is left whole); a second one raises KeyboardInterrupt
    at once (a long prefill). Only on the main thread, where signal handlers live."""

    def __init__(self):
        self.hit, self._old = False, None

    def __enter__(self) -> "_CtrlC":
        if threading.current_thread() is threading.main_thread():
            old = signal.getsignal(signal.SIGINT)
            if old is not None:  # None: a handler Python did not install, which it could not restore
                signal.signal(signal.SIGINT, self._handler)
                self._old = old
        return self

    def _handler(self, signum, frame) -> None:
        if self.hit:
            raise KeyboardInterrupt
        self.hit = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


# ---- the loop ----------------------------------------------------------------------------------

_COMMAND = re.compile(r"/(\w+)(?:\s+(.*))?", re.S)


def run_repl(session: "ChatSession", *, stdin: TextIO | None = None, out: TextIO | None = None,
             err: TextIO | None = None, stats: bool | None = None) -> None:
    """Chat on stdin/stdout (sys's, unless given) until /exit, end of input, or Ctrl-C at an
    empty prompt. stats: the timings line after each reply; None = when stderr is a terminal."""
    stdin, out, err = stdin or sys.stdin, out or sys.stdout, err or sys.stderr
    _Repl(session, stdin, out, err, _isatty(err) if stats is None else stats).run()


class _Repl:
    def __init__(self, session: "ChatSession", stdin: TextIO, out: TextIO, err: TextIO, stats: bool):
        self.session, self.out, self.err, self.stats = session, out, err, stats
        self.reader = _Reader(stdin, out, err)
        self.told_dropped = False

    def say(self, line: str) -> None:
        self.err.write(line + "\n")
        self.err.flush()

    def run(self) -> None:
        try:
            while True:
                kind, text = self.next_input()
                if kind == "exit":
                    return
                if kind == "command":
                    if self.command(text) == "exit":
                        return
                elif text.strip():
                    self.reply(text)
        finally:
            self.reader.close()

    # ---- input ---------------------------------------------------------------------------
    def next_input(self) -> tuple[str, str]:
        """("exit" | "command" | "text", what): one line, or a \"\"\" block of lines."""
        while True:
            try:
                line = self.reader.read(PROMPT)
            except KeyboardInterrupt:
                if self.reader.cleared():
                    self.err.write("\n")
                    continue
                self._leave()
                return "exit", ""
            if line is None:
                self._leave()
                return "exit", ""
            stripped = line.strip()
            if stripped.startswith(BLOCK):
                try:
                    return "text", self.block(line.lstrip()[len(BLOCK):])
                except KeyboardInterrupt:
                    self.err.write("\n")
                    self.say("(message dropped)")
                    continue
            if _COMMAND.fullmatch(stripped):
                return "command", stripped
            return "text", line

    def block(self, first: str) -> str:
        """The lines up to one that ends with \"\"\" (or the end of input)."""
        if first.rstrip().endswith(BLOCK) and first.strip():  # \"\"\"one line\"\"\"
            return first.rstrip()[: -len(BLOCK)]
        lines = [first] if first.strip() else []
        while True:
            line = self.reader.read(MORE)
            if line is None:
                break
            if line.rstrip().endswith(BLOCK):
                last = line.rstrip()[: -len(BLOCK)]
                if last.strip():
                    lines.append(last)
                break
            lines.append(line)
        return "\n".join(lines)

    def _leave(self) -> None:
        if self.reader.interactive:
            self.err.write("\n")  # the shell's prompt starts on a line of its own
            self.err.flush()

    # ---- commands ------------------------------------------------------------------------
    def command(self, text: str) -> str | None:
        name, arg = _COMMAND.fullmatch(text).groups()
        arg = (arg or "").strip()
        session = self.session
        try:
            if name in ("exit", "quit", "bye"):
                return "exit"
            if name == "help":
                self.say(HELP)
            elif name == "reset":
                session.reset()
                self.told_dropped = False
                self.say("(conversation reset)")
            elif name == "set":
                self.set(arg)
            elif name == "save":
                path = self._path(arg, "/save FILE")
                session.save(path)
                self.say(f"(saved {_count(len(session.messages), 'message')} to {path})")
            elif name == "load":
                path = self._path(arg, "/load FILE")
                session.load(path)
                self.told_dropped = False
                self.say(f"(loaded {_count(len(session.messages), 'message')} from {path})")
            else:
                self.say(f"unknown command /{name}; /help lists the commands")
        except EdgeLlamaError as exc:
            self.say(f"error: {exc}")
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            self.say(f"error: {where}{exc.strerror or exc}")
        return None

    def set(self, arg: str) -> None:
        if not arg:
            self.say(show_options(self.session.config))
            return
        parts = arg.split()
        if len(parts) != 2:
            raise BadArgumentError("/set NAME VALUE, e.g. /set temperature 0.7 (/set alone shows the values)")
        self.session.config = set_option(self.session.config, *parts)
        self.say(f"({parts[0]} = {parts[1]})")

    @staticmethod
    def _path(arg: str, usage: str) -> Path:
        if not arg:
            raise BadArgumentError(f"{usage}: give a file name")
        return Path(os.path.expanduser(arg))

    # ---- a turn --------------------------------------------------------------------------
    def reply(self, text: str) -> None:
        session, out = self.session, self.out
        dropped = session.dropped_turns
        try:
            gen = session.stream(text)
        except EdgeLlamaError as exc:
            self.say(f"error: {exc}")
            return
        interrupted, failed = False, None
        try:
            with _CtrlC() as ctrl_c:
                for step in gen:
                    out.write(step.text)
                    out.flush()
                    if ctrl_c.hit:
                        break
            interrupted = ctrl_c.hit
        except KeyboardInterrupt:
            interrupted = True
        except EdgeLlamaError as exc:  # the reply so far is kept (session.stream's on_abort)
            failed = exc
        session.interrupt(gen)  # after a break: keeps the reply as far as it got
        out.write("\n")
        out.flush()
        if failed is not None:
            self.say(f"error: {failed}")
        elif interrupted:
            self.say("(interrupted)")
        else:
            self.notices(gen)
        if session.dropped_turns > dropped and not self.told_dropped:
            self.told_dropped = True
            self.say(f"(the conversation no longer fits the model's {session.model.context_length}-token context: "
                     "it now sees only the latest turns; /save still writes them all)")
        if self.stats and gen.started:
            self.say(format_timings(gen))

    def notices(self, gen: "Generation") -> None:
        if not gen.text.strip():
            at_once = gen.completion_tokens == 0 and gen.finish_reason == "eos"
            self.say("(empty reply: the model ended its turn at once)" if at_once else "(empty reply)")
        if gen.finish_reason == "length":
            if gen.completion_tokens >= gen.config.max_new_tokens:
                self.say(f"(reply cut at max_new_tokens = {gen.config.max_new_tokens}; "
                         "/set max_new_tokens N allows longer ones)")
            else:
                self.say(f"(reply cut: it reached the end of the model's {self.session.model.context_length}-token "
                         "context)")


def _count(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")
