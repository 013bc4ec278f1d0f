"""The embeddable API: load a model folder once, generate from many threads.

    model = Model.load("smollm2-onnx")                 # provider="cpu", threads=None
    for step in model.generate("The best thing about AI is", max_new_tokens=32):
        print(step.text, end="", flush=True)
    text = model.generate_text("Hello", max_new_tokens=16)
    chat = model.chat(system="You are terse.")
    reply = chat.send("What is ONNX?")

A `Model` is read-only after loading and safe to share between threads; each
generation (and each ChatSession) owns its own KV cache and IO binding.
"""

from __future__ import annotations

import linecache
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from . import artifact
from . import contract as io
from .adapters import read_manifest
from .bundle import Unpacked, is_bundle, unpacking
from .contract import Manifest, find_chat_template, read_json_object
from .errors import BadArgumentError, BadModelFileError, ContextOverflowError, EdgeLlamaError
from .external_data import check_external_data
from .session import GraphIO, make_session
from .workers import shared

if TYPE_CHECKING:  # imported where used: they load in the worker beside the session build
    from tokenizers import Tokenizer

    from .chat_template import ChatTemplate
    from .decoder import Decoder
    from .generate import Generation, GenerationConfig


class Model:
    def __init__(self, folder: Path, manifest: Manifest, session, tokenizer: Tokenizer,
                 chat_template: ChatTemplate | None, provider: str):
        self.folder, self.manifest, self.session = folder, manifest, session
        self.tokenizer, self.chat_template, self.provider = tokenizer, chat_template, provider
        self.graph_io = GraphIO.from_session(session, str(folder / io.GRAPH_NAME), manifest.num_kv_heads,
                                             manifest.head_dim)
        self.kv_layout = manifest.kv_layout
        self.device = "cuda" if provider == "cuda" else "cpu"

    @classmethod
    def load(cls, folder: str | Path, provider: str = "cpu", threads: int | None = None,
             low_memory: bool = False) -> "Model":
        """low_memory=True, for scoring long windows (eval): no CPU memory arena, and a float
        graph's MatMuls read the weights where they are loaded (memory mapped) instead of a
        repacked copy. Eval of SmolLM2 int4 against fp32: 0.95 GB peak, the same figures and
        time as with two resident default sessions; but fp32 single-token decode runs 27 %
        slower without the repacked weights. Quantized graphs always prepack: MatMulNBits' fast kernels need it."""
        folder = Path(folder)
        if not folder.exists():
            raise BadArgumentError(f"{folder}: no such file or folder; give a model folder from "
                                   "'edgellama export' or a bundle from 'edgellama pack'")
        if is_bundle(folder):
            # Every file is checked against SHA256SUMS before use; the weight data (the bulk)
            # is hashed where it lies in the bundle, beside the session build, and a mismatch
            # discards the session unrun.
            with unpacking(folder) as opened:
                try:
                    model = cls._load_folder(opened.folder, provider, threads, opened, low_memory)
                except EdgeLlamaError as exc:  # name the bundle's member, not the private folder
                    text = str(exc).replace(str(opened.folder), str(folder))
                    if text == str(exc):
                        raise
                    raise type(exc)(text) from None
            model.folder = folder  # the unpacked files are gone; the session holds what it needs
            return model
        return cls._load_folder(folder, provider, threads, low_memory=low_memory)

    @classmethod
    def _load_folder(cls, folder: Path, provider: str, threads: int | None,
                     bundle: Unpacked | None = None, low_memory: bool = False) -> "Model":
        if not folder.is_dir():
            raise BadModelFileError(f"{folder}: not a model folder; run 'edgellama export' first")
        manifest = read_manifest(folder)
        plan = artifact.load_plan(folder, manifest, provider)
        check = bundle.check if bundle is not None else None
        graph, data_folder = plan.graph, None
        if bundle is not None and bundle.graph is not None and Path(plan.graph).name == io.GRAPH_NAME:
            graph, data_folder = bundle.graph, bundle.data_folder  # entries checked by unpacking (bundle.py)
        # The tokenizer and template load beside the session build. The session is built on
        # this thread: built in a worker, its weights land in that thread's malloc arena, and
        # decode measured ~5 % slower (SmolLM2 int4, 3 of 4 A/B pairs). onnxruntime releases
        # the GIL while it builds, but tokenizers holds it while parsing tokenizer.json, so the
        # worker waits until this thread is inside onnxruntime before it starts: otherwise the
        # two run one after the other (measured: +90 ms on SmolLM2).
        building = threading.Event()
        building.set()
        pool = shared("edgellama-load", 2)  # runtime.workers: a Ctrl-C mid-load never leaves exit waiting
        checking = pool.submit(check) if check is not None else None  # hashing releases the GIL
        loading = pool.submit(_load_text_side, folder, manifest, (threading.get_ident(), building))
        try:
            if isinstance(graph, Path) and graph.suffix == ".onnx":
                check_external_data(graph)  # before onnxruntime opens any file it names
            config = plan.config
            if low_memory and manifest.weights in ("fp32", "fp16"):  # never a MatMulNBits graph
                config = {**config, "session.disable_prepacking": "1"}
            session = make_session(graph, provider, threads, plan.optimize, config, data_folder,
                                   arena=not low_memory)
        except BadModelFileError:
            if check is not None:
                check()  # a damaged bundle says so, rather than how the damage made loading fail
            raise
        finally:
            building.clear()  # done (or failed): the worker need not wait any longer
        if checking is not None:
            checking.result()  # raises on a mismatch: the session is dropped unused
        tokenizer, template = loading.result()
        return cls(folder, manifest, session, tokenizer, template, provider)

    # ---- facts --------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.graph_io.vocab_size or self.manifest.vocab_size

    @property
    def context_length(self) -> int:
        return self.manifest.context_length

    @property
    def eos_token_ids(self) -> list[int]:
        return self.manifest.eos_token_ids

    # ---- text <-> ids -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids as the model's tokenizer gives them (BOS only if the model adds one)."""
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        if self.chat_template is None:
            raise BadArgumentError(f"{self.folder}: this model has no chat template; use a plain prompt")
        text = self.chat_template.render(messages, add_generation_prompt=add_generation_prompt)
        return self.encode(text, add_special_tokens=False)  # the template writes BOS itself

    # ---- generation ---------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], config: GenerationConfig | None = None,
                 **options) -> Generation:
        """Stream `Step`s. `prompt` is text or token ids; options are GenerationConfig
        fields (max_new_tokens, stop, ...) or SamplingParams fields (temperature, ...)."""
        from .generate import Generation

        ids = self.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return Generation(self, ids, config or make_config(**options))

    def generate_text(self, prompt: str | Sequence[int], **options) -> str:
        gen = self.generate(prompt, **options)
        for _ in gen:
            pass
        return gen.text

    def chat(self, system: str | None = None, config: GenerationConfig | None = None, **options) -> "ChatSession":
        return ChatSession(self, system, config or make_config(**options))


CONSTRAINT_OPTIONS = ("json_schema", "grammar", "regex", "json")


def make_config(**options) -> GenerationConfig:
    """GenerationConfig from flat options: its own fields, SamplingParams' fields, and the
    constraints json_schema= (a dict), grammar= (Lark or GBNF text), regex=, json=True."""
    from .generate import GenerationConfig
    from .sampling import SamplingParams

    constraint = {k: options.pop(k) for k in CONSTRAINT_OPTIONS if k in options}
    if any(v not in (None, False) for v in constraint.values()):
        from .constrain import Grammar

        if options.get("constraint") is not None:
            raise BadArgumentError("give constraint= or one of json_schema= / grammar= / regex= / json=, not both")
        options["constraint"] = Grammar.from_options(**constraint)

    sampling_fields = set(SamplingParams.__dataclass_fields__)
    unknown = set(options) - sampling_fields - set(GenerationConfig.__dataclass_fields__)
    if unknown:
        raise BadArgumentError(f"unknown generation option(s): {', '.join(sorted(unknown))}")
    sampling = SamplingParams(**{k: v for k, v in options.items() if k in sampling_fields})
    rest = {k: v for k, v in options.items() if k not in sampling_fields}
    if "stop" in rest:
        rest["stop"] = tuple(rest["stop"])
    if "stop_token_ids" in rest:
        rest["stop_token_ids"] = tuple(rest["stop_token_ids"])
    return GenerationConfig(sampling=sampling, **rest)


class ChatSession:
    """A conversation whose KV cache lives across turns: each turn prefills only the
    tokens the cache does not already hold, so it equals re-running the whole history.

    `messages` is the whole conversation ([{"role", "content"}], a system prompt first if
    any); the model sees the system prompt and the latest turns that fit its context with
    room for a reply (`reply_room`). Where they no longer fit, the oldest user/assistant
    turns drop out of what the model sees (`dropped_turns` counts them; `messages` keeps
    them). A reply stopped early (`interrupt`, a closed or abandoned stream, Ctrl-C inside
    it) joins the history as far as it got, and the next turn goes on from there.
    `config` may be replaced between turns."""

    def __init__(self, model: Model, system: str | None, config: GenerationConfig):
        self.model, self.config = model, config
        self.system = system
        self._messages: list[dict] = [{"role": "system", "content": system}] if system else []
        self._start = 0  # the first message after the system prompt that the model still sees
        self._decoder: Decoder | None = None
        self._drafter_key = self._drafter = None  # the speculate= option and its drafter, kept across turns
        self._current: Generation | None = None

    # ---- the conversation -----------------------------------------------------------------
    @property
    def messages(self) -> list[dict]:
        """The whole conversation, turns dropped from the model's view included."""
        return self._messages

    @messages.setter
    def messages(self, messages: list[dict]) -> None:
        """Replace the conversation (checked; see `check_messages`). Without a system
        message of its own it keeps the session's system prompt."""
        self.interrupt()
        messages = check_messages(messages)
        if messages and messages[0]["role"] == "system":
            self.system = messages[0]["content"]
        elif self.system:
            messages = [{"role": "system", "content": self.system}] + messages
        self._messages, self._start = messages, 0

    @property
    def dropped_turns(self) -> int:
        """User turns the model no longer sees: they did not fit its context."""
        return sum(m["role"] == "user" for m in self._body()[: self._start])

    @property
    def reply_room(self) -> int:
        """Tokens kept free for a reply when fitting the history into the context: the
        config's max_new_tokens, but no more than a quarter of the context."""
        return min(self.config.max_new_tokens, max(self.model.context_length // 4, 1))

    def reset(self) -> None:
        self.interrupt()
        self._messages = self._messages[:1] if self.system else []
        self._start = 0
        self._decoder = self._drafter_key = None

    def save(self, path: str | Path) -> None:
        """Write `messages` as a JSON list (whole or not at all: through a temporary file)."""
        import json
        import os

        path = Path(path)
        part = path.with_name(path.name + ".part")
        try:
            part.write_text(json.dumps(self._messages, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
            os.replace(part, path)
        finally:
            part.unlink(missing_ok=True)

    def load(self, path: str | Path) -> None:
        """Replace the conversation with a JSON list of messages (as `save` writes)."""
        import json

        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError:
            raise BadArgumentError(f"{path}: not UTF-8 text; give a JSON file written by /save") from None
        except json.JSONDecodeError as exc:
            raise BadArgumentError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}); "
                                   "give a file written by /save") from None
        try:
            self.messages = data
        except BadArgumentError as exc:
            raise BadArgumentError(f"{path}: {exc}") from None

    # ---- turns ----------------------------------------------------------------------------
    def stream(self, user_text: str) -> Generation:
        """Generate the reply to `user_text`; the reply joins the history when the stream
        ends, or as far as it got when it stops early (see the class docstring)."""
        from .decoder import Decoder
        from .generate import Generation

        self.interrupt()
        if not isinstance(user_text, str):
            raise BadArgumentError(f"a chat message is text, got {type(user_text).__name__}")
        user = {"role": "user", "content": user_text}
        start, ids = self._fit(user)
        turn = self._head() + self._body() + [user]
        if self._decoder is None:
            self._decoder = Decoder(self.model, len(ids) + self.config.max_new_tokens)

        def record(gen: Generation) -> None:
            if self._current is gen:
                self._current = None
            self._messages = turn + [{"role": "assistant", "content": gen.text}]
            self._start = start
            if not gen.consistent:  # stopped inside a forward: start the next turn afresh
                self._decoder = self._drafter_key = None

        gen = Generation(self.model, ids, self.config, decoder=self._decoder, on_finish=record, on_abort=record,
                         drafter=self._drafter_for(self.config))
        self._current = gen
        return gen

    def _drafter_for(self, config: GenerationConfig):
        """The drafter, kept across turns: a draft model then prefills only each turn's new
        tokens, as the target does (None: Generation makes one, or there is none)."""
        from .speculate import make_drafter

        if config.speculate is None or not config.draft_tokens or config.speculate == "ngram":
            return None  # n-gram lookup holds no state worth keeping
        if self._drafter_key is not config.speculate:
            self._drafter_key, self._drafter = config.speculate, make_drafter(config.speculate, self.model)
        return self._drafter

    def send(self, user_text: str) -> str:
        gen = self.stream(user_text)
        for _ in gen:
            pass
        return gen.text

    def interrupt(self, gen: Generation | None = None) -> None:
        """Stop the reply being streamed (or `gen`, if it is still this session's), keeping
        it in the history as far as it got. One never started is dropped with its message."""
        current = self._current
        if current is None or (gen is not None and gen is not current):
            return
        self._current = None
        current.close()

    # ---- fitting the context ----------------------------------------------------------------
    def _head(self) -> list[dict]:
        return self._messages[:1] if self._messages and self._messages[0]["role"] == "system" else []

    def _body(self) -> list[dict]:
        return self._messages[len(self._head()):]

    def _fit(self, user: dict) -> tuple[int, list[int]]:
        """The first message of the body the model can see this turn, and the prompt's ids:
        the latest turns (whole ones, from the last start on) that fit the context with
        reply_room to spare. Raises ContextOverflowError only if the new message alone (with
        the system prompt) leaves no room at all."""
        head, body, limit = self._head(), self._body(), self.model.context_length
        need = limit - self.reply_room  # the most prompt tokens that leave room for a reply
        render = lambda s: self.model.render_chat(head + body[s:] + [user])  # noqa: E731
        start = min(self._start, len(body))
        ids = render(start)
        if len(ids) <= need:
            return start, ids
        # Turn boundaries after `start`: where a user message begins; len(body) = none kept.
        cuts = [i for i in range(start + 1, len(body)) if body[i]["role"] == "user"] + [len(body)]
        alone = render(cuts[-1])
        if len(alone) >= limit:
            what = "with the system prompt " if head else ""
            raise ContextOverflowError(
                f"this message is {len(alone)} tokens {what}but the model's context is {limit}; shorten it")
        if len(alone) > need:
            return cuts[-1], alone  # the whole history goes; the reply gets what is left
        lo, hi, best = 0, len(cuts) - 1, (cuts[-1], alone)  # the earliest cut that fits
        while lo < hi:
            mid = (lo + hi) // 2
            trial = render(cuts[mid])
            if len(trial) <= need:
                hi, best = mid, (cuts[mid], trial)
            else:
                lo = mid + 1
        return best


ROLES = ("system", "user", "assistant")


def check_messages(messages) -> list[dict]:
    """A copy of `messages` as [{"role", "content"}], or BadArgumentError naming the first fault:
    a list of objects, each with a role (system, user or assistant; system only first) and
    text content."""
    if not isinstance(messages, list):
        raise BadArgumentError(f"expected a JSON list of messages, got {_kind(messages)}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadArgumentError(f"message {i + 1} is {_kind(m)}; give {{\"role\": ..., \"content\": ...}}")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise BadArgumentError(f"message {i + 1} has role {role!r}; use system, user or assistant")
        if role == "system" and i:
            raise BadArgumentError(f"message {i + 1} is a system message; only the first may be")
        if not isinstance(content, str):
            raise BadArgumentError(f"message {i + 1} has content {_kind(content)}; give text")
        out.append({"role": role, "content": content})
    return out


def _kind(x) -> str:
    return {dict: "an object", list: "a list", str: "text", type(None): "null"}.get(type(x), f"a {type(x).__name__}")


def _load_text_side(folder: Path, manifest: Manifest, builder: tuple[int, threading.Event] | None = None
                    ) -> tuple[Tokenizer, ChatTemplate | None]:
    if builder is not None:
        _wait_for_session_build(*builder)
    from . import generate  # noqa: F401  (imported here, beside the session build, for the first token)

    tokenizer = _load_tokenizer(folder)
    return tokenizer, _load_chat_template(folder, tokenizer, manifest)


def _wait_for_session_build(thread: int, building: threading.Event, poll_s: float = 0.001,
                            settle_s: float = 0.05, give_up_s: float = 2.0) -> None:
    """Return once `thread` is inside onnxruntime's session initialization with the GIL
    released, so that what this thread does next runs beside it rather than before it.

    A thread that wants the GIL runs while this one sleeps, so a frame that has not moved
    across a poll is blocked in C without the GIL. onnxruntime does that twice: reading the
    graph (up to ~25 ms) and initializing the session (prepacking the weights, the long
    part); the second is recognized by its source line. Failing that (another onnxruntime
    version), a frame that has not moved for settle_s will do; never longer than give_up_s."""
    frames = getattr(sys, "_current_frames", None)  # CPython's; elsewhere: start at once
    deadline = time.monotonic() + give_up_s
    seen, since = None, time.monotonic()
    while frames is not None and building.is_set() and time.monotonic() < deadline:
        frame = frames().get(thread)
        if frame is None:
            return
        where = (id(frame), frame.f_lasti)
        initializing = (frame.f_code.co_name == "_create_inference_session"
                        and "initialize_session" in linecache.getline(frame.f_code.co_filename, frame.f_lineno))
        del frame
        now = time.monotonic()
        if where != seen:
            seen, since = where, now
        elif initializing or now - since >= settle_s:
            return
        time.sleep(poll_s)


def _load_tokenizer(folder: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    path = folder / io.TOKENIZER_NAME
    if not path.is_file():
        raise BadModelFileError(f"{path}: {io.TOKENIZER_NAME} is missing; re-export the model")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises a bare Exception for malformed files
        raise BadModelFileError(f"{path}: malformed tokenizer ({str(exc).splitlines()[0][:200]}); re-export the model") from None


def _load_chat_template(folder: Path, tokenizer: Tokenizer, manifest: Manifest) -> ChatTemplate | None:
    source = find_chat_template(folder)
    if not source:
        return None
    from .chat_template import ChatTemplate

    cfg_path = folder / io.TOKENIZER_CONFIG_NAME
    cfg = read_json_object(cfg_path) if cfg_path.is_file() else {}
    token = lambda tid: tokenizer.id_to_token(tid) if tid is not None else None  # noqa: E731
    eos = manifest.eos_token_ids[0] if manifest.eos_token_ids else None
    return ChatTemplate(source, bos_token=_text(cfg.get("bos_token")) or token(manifest.bos_token_id),
                        eos_token=_text(cfg.get("eos_token")) or token(eos))


def _text(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok
