"""Tool calls (OpenAI function tools) for the server: how a model is told about tools,
the grammar that holds its calls to the tools' schemas, and the parser that turns its
output back into `tool_calls`.

Each model gets one tool format, found by rendering its chat template (not from its
architecture's name): a conversation with a probe tool, a call to it and the call's result.

    format  | the template renders a call as  | the model answers (A: {"name": N, "arguments": {...}})
    --------+---------------------------------+------------------------------------------------------
    hermes  | <tool_call> (Qwen2.5/3, Hermes) | <tool_call>\nA\n</tool_call>, a block a call, "\n" between
    llama3  | {"name": N, "parameters": ...}  | {"name": N, "parameters": {...}}: one call (Llama 3.1-3.3
            |                                 | templates render one a turn)
    mistral | [TOOL_CALLS] (Mistral v3)       | [TOOL_CALLS][A, A, ...]
    generic | no tools (SmolLM2, Llama 2), or | as hermes, taught by a system-prompt section
            | a form not listed here          | (GENERIC_SECTION)

Native formats get `tools=` in the template (as transformers passes them), assistant
`tool_calls` (arguments as a dict when they are a JSON object, as templates expect) and
`tool` messages; the generic one renders calls as text in the assistant's message and
results as <tool_response> blocks in a user message.

The grammar (llguidance Lark, each tool's parameters embedded with `%json`, names as
literals) enforces every call: `required` and a named choice allow only calls; `auto`
allows free text or calls: for hermes / generic / mistral, text that never contains the
call marker, or text up to the marker followed by calls; for llama3, text that does not
start with `{`, or the call. With a response_format schema too, `auto` allows an answer
that follows it or calls (llama3: one JSON schema, anyOf the answer and the calls). So a call
the parser sees is always a whole, valid one, unless the token limit or a stop string cut it.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import uuid
import weakref
from dataclasses import dataclass, field
from typing import Any

from edgellama.runtime.errors import EdgeLlamaError

NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
MAX_TOOLS = 128
NO_PARAMETERS = {"type": "object", "properties": {}, "additionalProperties": False}
# Arguments laid out as the templates' tojson writes them: no free whitespace to wander in.
COMPACT = {"whitespace_flexible": False, "key_separator": ": ", "item_separator": ", "}


@dataclass(frozen=True)
class ToolFormat:
    name: str
    native: bool  # the template takes tools=, tool_calls and tool messages itself
    trigger: str  # the text that starts calls ("" for llama3: the output's first "{")
    open: str  # before each call
    close: str  # after each call
    separator: str  # between calls
    prefix: str  # before all calls (after the trigger)
    suffix: str  # after all calls
    args_key: str  # "arguments" | "parameters"
    parallel: bool  # more than one call a turn


_HERMES = dict(trigger="<tool_call>", open="<tool_call>\n", close="\n</tool_call>", separator="\n", prefix="",
               suffix="", args_key="arguments", parallel=True)
FORMATS = {
    "hermes": ToolFormat("hermes", True, **_HERMES),
    "llama3": ToolFormat("llama3", True, trigger="", open="", close="", separator="", prefix="", suffix="",
                         args_key="parameters", parallel=False),
    "mistral": ToolFormat("mistral", True, trigger="[TOOL_CALLS]", open="", close="", separator=", ",
                          prefix="[TOOL_CALLS][", suffix="]", args_key="arguments", parallel=True),
    "generic": ToolFormat("generic", False, **_HERMES),
}

GENERIC_SECTION = """# Tools

You may call functions to help with the user's request. Their signatures, as JSON, are between <tools></tools>:
<tools>
{tools}
</tools>

To call a function, reply with a JSON object of its name and arguments in <tool_call></tool_call> tags, one per call:
<tool_call>
{{"name": <function-name>, "arguments": <arguments-as-a-JSON-object>}}
</tool_call>
The result of each call comes back between <tool_response></tool_response> tags."""


@dataclass(frozen=True)
class Tool:
    name: str
    description: str | None
    parameters: dict | bool
    spec: dict  # as given, for the template: {"type": "function", "function": {...}}


@dataclass(frozen=True)
class ToolPlan:
    """What the answer needs to parse a generation with tools."""

    format: ToolFormat
    markers: dict = field(default_factory=dict)  # special token id -> its text (skipped by the detokenizer)


# --- the model's format ---------------------------------------------------------------------------

_PROBE_TOOL = {"type": "function", "function": {
    "name": "probe_tool_fn", "description": "probe",
    "parameters": {"type": "object", "properties": {"probe_arg": {"type": "string"}}, "required": ["probe_arg"]}}}
_PROBE_ID = "a1b2c3d4e"  # 9 letters and digits: what Mistral's templates insist on
_PROBE_CHAT = [
    {"role": "user", "content": "probe question"},
    {"role": "assistant", "content": "", "tool_calls": [{"id": _PROBE_ID, "type": "function", "function": {
        "name": "probe_tool_fn", "arguments": {"probe_arg": "probe value"}}}]},
    {"role": "tool", "tool_call_id": _PROBE_ID, "name": "probe_tool_fn", "content": "probe result"},
]
_formats: "weakref.WeakKeyDictionary[Any, ToolFormat]" = weakref.WeakKeyDictionary()
_formats_lock = threading.Lock()


def tool_format(model) -> ToolFormat:
    """The model's tool format (probed once per model)."""
    with _formats_lock:
        found = _formats.get(model)
    if found is None:
        found = FORMATS[detect_format(model.chat_template)]
        with _formats_lock:
            _formats[model] = found
    return found


def detect_format(template) -> str:
    """hermes | llama3 | mistral | generic, from what the template renders for a probe tool,
    a call to it and its result. generic where the template ignores tools, fails on them,
    or renders a call in a form not listed here."""
    if template is None:
        return "generic"
    user = _PROBE_CHAT[:1]
    try:
        plain = template.render(user)
        with_tools = template.render(user, tools=[_PROBE_TOOL])
        history = template.render(_PROBE_CHAT, tools=[_PROBE_TOOL])
    except EdgeLlamaError:
        return "generic"
    if with_tools == plain or "probe_tool_fn" not in with_tools or "probe result" not in history:
        return "generic"
    if "<tool_call>" in history:
        return "hermes"
    if "[TOOL_CALLS]" in history:
        return "mistral"
    if re.search(r'"name":\s*"probe_tool_fn",\s*"parameters":', history):
        return "llama3"
    return "generic"


# --- requests -----------------------------------------------------------------------------------


class ToolError(ValueError):
    """A bad tools field: (param, message)."""

    def __init__(self, param: str, message: str, code: str = "invalid_value"):
        super().__init__(message)
        self.param, self.message, self.code = param, message, code


def parse_tools(tools: Any) -> list[Tool]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ToolError("tools", "tools must be a list of {\"type\": \"function\", \"function\": {...}} objects",
                        "invalid_type")
    if len(tools) > MAX_TOOLS:
        raise ToolError("tools", f"tools holds {len(tools)} tools; at most {MAX_TOOLS} are allowed")
    out, seen = [], set()
    for i, t in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            got = t.get("type") if isinstance(t, dict) else t
            raise ToolError(f"{where}.type", f"{where}: only function tools ({{\"type\": \"function\", "
                                             f"\"function\": {{...}}}}) are supported, got {got!r:.60}")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise ToolError(f"{where}.function", f"{where}.function must be an object with a name",
                            "missing_required_parameter" if fn is None else "invalid_type")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise ToolError(f"{where}.function.name", f"{where}.function.name must be 1 to 64 letters, digits, "
                                                      f"underscores or dashes, got {name!r:.80}")
        if name in seen:
            raise ToolError(f"{where}.function.name", f"{where}: the function name {name!r} is used twice")
        seen.add(name)
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise ToolError(f"{where}.function.description", f"{where}.function.description must be a string",
                            "invalid_type")
        parameters = fn.get("parameters")
        if parameters is None:
            parameters = NO_PARAMETERS
        elif not isinstance(parameters, dict):
            raise ToolError(f"{where}.function.parameters",
                            f"{where}.function.parameters must be a JSON schema object", "invalid_type")
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise ToolError(f"{where}.function.strict", f"{where}.function.strict must be true or false",
                            "invalid_type")
        spec_fn = {k: v for k, v in {"name": name, "description": description, "parameters": parameters}.items()
                   if v is not None}
        out.append(Tool(name, description, parameters, {"type": "function", "function": spec_fn}))
    return out


def parse_choice(choice: Any, tools: list[Tool]) -> str:
    """"none" | "auto" | "required" | a tool's name (a named choice). Default: auto with
    tools, none without."""
    if choice is None:
        return "auto" if tools else "none"
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise ToolError("tool_choice", "tool_choice must be none, auto, required or {\"type\": \"function\", "
                                           f"\"function\": {{\"name\": ...}}}}, got {choice!r:.60}")
        if choice != "none" and not tools:
            raise ToolError("tool_choice", f"tool_choice {choice!r} needs tools; give tools or leave tool_choice out")
        return choice
    fn = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise ToolError("tool_choice", "a named tool_choice is {\"type\": \"function\", \"function\": {\"name\": ...}}",
                        "invalid_type")
    if name not in {t.name for t in tools}:
        raise ToolError("tool_choice", f"tool_choice names the function {name!r:.80}, which is not in tools")
    return name


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


# --- prompts ------------------------------------------------------------------------------------


def prepare(fmt: ToolFormat, messages: list[dict], tools: list[Tool] | None) -> tuple[list[dict], list | None]:
    """The messages and the tools= value for the template. messages come checked: assistant
    ones may hold tool_calls ([{id, type, function: {name, arguments (a string)}}]), tool ones
    a tool_call_id. tools: those to show the model (None: none)."""
    if fmt.native:
        return _native(fmt, messages), ([t.spec for t in tools] if tools else None)
    return _generic(messages, tools), None


def _arguments(text: Any) -> Any:
    """A call's arguments as templates expect them: the object where the string is one."""
    if isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            return text
        return value if isinstance(value, dict) else text
    return text


def _native(fmt: ToolFormat, messages: list[dict]) -> list[dict]:
    ids = (lambda i: hashlib.sha256(i.encode()).hexdigest()[:9]) if fmt.name == "mistral" else (lambda i: i)
    names: dict[str, str] = {}
    out = []
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                names[c["id"]] = c["function"]["name"]
                calls.append({"id": ids(c["id"]), "type": "function",
                              "function": {"name": c["function"]["name"],
                                           "arguments": _arguments(c["function"]["arguments"])}})
            out.append({"role": "assistant", "content": m["content"], "tool_calls": calls})
        elif m["role"] == "tool":
            out.append({"role": "tool", "tool_call_id": ids(m["tool_call_id"]),
                        "name": names.get(m["tool_call_id"], ""), "content": m["content"]})
        else:
            out.append(m)
    return out


def generic_section(tools: list[Tool]) -> str:
    return GENERIC_SECTION.format(tools="\n".join(json.dumps(t.spec, ensure_ascii=False) for t in tools))


def call_text(name: str, arguments: Any, fmt: ToolFormat = FORMATS["generic"]) -> str:
    args = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return f'{fmt.open}{{"name": {json.dumps(name, ensure_ascii=False)}, "{fmt.args_key}": {args}}}{fmt.close}'


def _generic(messages: list[dict], tools: list[Tool] | None) -> list[dict]:
    out: list[dict] = []
    from_tools = False  # the last message out holds tool results
    for m in messages:
        if m["role"] == "assistant" and m.get("tool_calls"):
            calls = "\n".join(call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": f"{m['content']}\n{calls}" if m["content"] else calls})
            from_tools = False
        elif m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if out and out[-1]["role"] == "user" and from_tools:
                out[-1] = {"role": "user", "content": out[-1]["content"] + "\n" + block}
            else:
                out.append({"role": "user", "content": block})
            from_tools = True
        elif m["role"] == "user" and from_tools:  # one user turn, so that roles still alternate
            out[-1] = {"role": "user", "content": out[-1]["content"] + "\n\n" + m["content"]}
            from_tools = False
        else:
            out.append(dict(m))
            from_tools = False
    if tools:
        section = generic_section(tools)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out


def section_in_user(messages: list[dict], tools: list[Tool]) -> list[dict]:
    """For templates that refuse a system message: the tools section opens the first user message."""
    out = [m for m in messages]
    section = generic_section(tools)
    if out and out[0]["role"] == "system" and out[0]["content"].endswith(section):
        head = out.pop(0)["content"][: -len(section)].rstrip("\n")
        section = f"{head}\n\n{section}" if head else section
    for i, m in enumerate(out):
        if m["role"] == "user":
            out[i] = {**m, "content": section + "\n\n" + m["content"]}
            break
    return out


# --- the grammar --------------------------------------------------------------------------------


def _lit(text: str) -> str:
    return json.dumps(text)  # a Lark string literal (ASCII, JSON escapes)


_REGEX_META = set("\\.+*?()|[]{}^$#&-~/")


def _regex_text(text: str) -> str:
    return "".join("\\" + c if c in _REGEX_META else c for c in text)


def _marker(model, text: str) -> tuple[str, int | None]:
    """A Lark expression for `text`, and the id of the special token that is all of it, if one is."""
    tok = getattr(model, "tokenizer", None)
    token_id = tok.token_to_id(text) if tok is not None else None
    if token_id is not None:
        added = tok.get_added_tokens_decoder().get(token_id)
        if added is not None and added.special:
            return f"<[{token_id}]>", token_id
    return _lit(text), None


def _compact(schema: dict | bool) -> dict | bool:
    if not isinstance(schema, dict):
        return schema
    given = schema.get("x-guidance")
    return {**schema, "x-guidance": {**COMPACT, **(given if isinstance(given, dict) else {})}}


def _bounded(schema: dict | bool) -> dict | bool:
    """The whitespace rule Grammar.json_schema gives a schema without its own x-guidance."""
    from edgellama.runtime.constrain import WHITESPACE

    if isinstance(schema, dict) and "x-guidance" not in schema:
        return {**schema, "x-guidance": {"whitespace_pattern": WHITESPACE}}
    return schema


def _seq(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def grammar(model, fmt: ToolFormat, tools: list[Tool], choice: str, parallel: bool,
            response: dict | bool | None = None) -> tuple[str, dict]:
    """The Lark grammar for a turn with tools (choice: auto, required or a tool's name), and
    the special tokens it uses, which the detokenizer skips ({id: text}). response: the JSON
    schema a text answer must follow (auto only), if any.

    calls := prefix one (separator one)* suffix;  one := open call close;  call := fn0 | fn1 ..."""
    allowed = tools if choice in ("auto", "required") else [t for t in tools if t.name == choice]
    parallel = parallel and fmt.parallel
    markers: dict = {}
    specials = [m for m in (fmt.trigger, fmt.close.strip()) if m]

    def literal(text: str) -> str:
        """Lark for `text`, its markers as special tokens where the tokenizer has them so."""
        for special in specials:
            if special in text:
                head, _, tail = text.partition(special)
                expr, token_id = _marker(model, special)
                if token_id is not None:
                    markers[token_id] = special
                return _seq(literal(head), expr, literal(tail))
        return _lit(text) if text else ""

    rules = []
    for k, tool in enumerate(allowed):
        head = f'{{"name": "{tool.name}", "{fmt.args_key}": '
        rules.append(f"fn{k}: {_lit(head)} args{k} {_lit('}')}")
        rules.append(f"args{k}: %json {json.dumps(_compact(tool.parameters))}")
    rules.append("call: " + " | ".join(f"fn{k}" for k in range(len(allowed))))
    rules.append(f"one: {_seq(literal(fmt.open), 'call', literal(fmt.close))}")
    more = f"({_seq(literal(fmt.separator), 'one')})*" if parallel else ""
    rules.append(f"calls: {_seq(literal(fmt.prefix), 'one', more, literal(fmt.suffix))}")

    if choice != "auto":
        start = "start: calls"
    elif response is not None and not fmt.trigger:  # llama3: answer and call are both objects: one schema
        objects = [{"type": "object", "properties": {"name": {"const": t.name}, fmt.args_key: t.parameters},
                    "required": ["name", fmt.args_key], "additionalProperties": False} for t in allowed]
        start = "start: answer"
        rules.append(f"answer: %json {json.dumps(_compact({'anyOf': [*objects, response]}))}")
    elif response is not None:
        start = "start: response | calls"
        rules.append(f"response: %json {json.dumps(_bounded(response))}")
    elif not fmt.trigger:  # llama3: a call is the whole answer and starts with "{"
        start = "start: TEXT | calls"
        rules.append(r"TEXT: /(?s:.*)/ & ~/[ \t\r\n]*\{(?s:.*)/")
    else:
        expr, token_id = _marker(model, fmt.trigger)
        if token_id is not None:  # a special token: free text cannot hold it anyway
            markers[token_id] = fmt.trigger
            start = "start: TEXT | calls | TEXT calls"
            rules.append(r"TEXT: /(?s:.+)/")
        else:  # text without the marker, or text up to the marker and then the calls
            after = (fmt.prefix + fmt.open)[len(fmt.trigger):]
            start = "start: TEXT | " + _seq("head", literal(after), "call", literal(fmt.close), more,
                                            literal(fmt.suffix))
            marker = _regex_text(fmt.trigger)
            rules.append(f"TEXT: /(?s:.*)/ & ~/(?s:.*){marker}(?s:.*)/")
            rules.append(f"head[lazy]: /(?s:.*){marker}/")
    return "\n".join([start, *rules]) + "\n", markers


# --- the answer ---------------------------------------------------------------------------------


class CallParser:
    """Splits a streamed answer into content and tool calls, as OpenAI's deltas go:
    ("content", text), ("call", index, id, name), ("arguments", index, text). Text that
    may be the start of the call marker, and whitespace before it, is held back until it
    is known; whitespace around calls is dropped."""

    HEAD = re.compile(r'\s*\[?\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*')
    MAX_HEAD = 4096  # characters after a marker without a call's head: it was text after all

    def __init__(self, fmt: ToolFormat):
        self.fmt = fmt
        self.state = "text" if fmt.trigger else "start"  # llama3: a call is the answer's first "{"
        self.buf = ""  # text not yet given out
        self.raw = ""  # the marker consumed before a head that is not yet whole
        self.calls: list[dict] = []  # {"id", "name", "arguments"}
        self._value: _Value | None = None

    def feed(self, text: str) -> list[tuple]:
        self.buf += text
        out: list[tuple] = []
        while self._step(out):
            pass
        return out

    def finish(self) -> list[tuple]:
        """What is held back, at the end of the generation."""
        out: list[tuple] = []
        while self._step(out):
            pass
        if self.state in ("text", "start", "plain") and (self.buf.strip() or not self.calls):
            self._content(out, self.buf)
        elif self.state == "head":
            self._content(out, self.raw + self.buf)
        self.buf, self.state = "", "done"
        return out

    def _content(self, out: list, text: str) -> None:
        if text:
            out.append(("content", text))

    def _step(self, out: list) -> bool:
        """One move of the state machine; False when it must wait for more text."""
        fmt, state = self.fmt, self.state
        if state == "start":
            rest = self.buf.lstrip()
            if not rest:
                return False
            self.state = "head" if rest[0] == "{" else "plain"
            return True
        if state == "plain":
            self._content(out, self.buf)
            self.buf = ""
            return False
        if state == "text":
            at = self.buf.find(fmt.trigger)
            if at >= 0:
                before = self.buf[:at].rstrip()
                if before.strip() or not self.calls:
                    self._content(out, before)
                self.raw, self.buf = fmt.trigger, self.buf[at + len(fmt.trigger):]
                self.state = "head"
                return True
            hold = next((k for k in range(len(fmt.trigger) - 1, 0, -1) if self.buf.endswith(fmt.trigger[:k])), 0)
            sure = self.buf[: len(self.buf) - hold].rstrip()
            if self.calls and not sure.strip():
                return False
            self._content(out, sure)
            self.buf = self.buf[len(sure):]
            return False
        if state == "head":
            match = self.HEAD.match(self.buf)
            if match is None:
                key = self.buf.lstrip(" \t\r\n[{")  # a call's first key is "name"
                if len(self.buf) > self.MAX_HEAD or (key and not (key.startswith('"name"')
                                                                  or '"name"'.startswith(key[:6]))):
                    self._content(out, self.raw + self.buf)
                    self.buf, self.raw, self.state = "", "", "text" if fmt.trigger else "plain"
                    return True
                return False
            try:
                name = json.loads(f'"{match[1]}"')
            except ValueError:
                name = match[1]
            call = {"id": new_call_id(), "name": name, "arguments": ""}
            self.calls.append(call)
            out.append(("call", len(self.calls) - 1, call["id"], name))
            self.buf, self.raw, self.state, self._value = self.buf[match.end():], "", "args", _Value()
            return True
        if state == "args":
            if self._value.kind is None:  # the whitespace before the value is not part of it
                self.buf = self.buf.lstrip()
            used, done = self._value.feed(self.buf)
            piece, self.buf = self.buf[:used], self.buf[used:]
            if piece:
                self.calls[-1]["arguments"] += piece
                out.append(("arguments", len(self.calls) - 1, piece))
            if done:
                self.state = "after"
            return done
        if state == "after":  # the call object's "}", then what follows a call in this format
            rest = self.buf.lstrip()
            if not rest:
                return False
            if rest[0] != "}":
                self.buf, self.state = rest, "text" if fmt.trigger else "plain"
                return True
            rest = rest[1:].lstrip()
            close = fmt.close.strip()
            if close:  # hermes, generic: </tool_call>, then text (which may hold the next call)
                if rest.startswith(close):
                    self.buf, self.state = rest[len(close):], "text"
                    return True
                if close.startswith(rest):
                    return False
                self.buf, self.state = rest, "text"
                return True
            if not rest:
                return False
            if rest[0] == fmt.separator.strip():  # mistral "," / llama3 ";": the next call
                self.buf, self.state = rest[1:], "head"
                return True
            if fmt.suffix and rest[0] == fmt.suffix:
                rest = rest[1:]
            self.buf, self.state = rest, "text" if fmt.trigger else "plain"
            return True
        return False


class _Value:
    """Finds where one JSON value ends in text fed piece by piece."""

    def __init__(self):
        self.kind: str | None = None  # container | string | scalar
        self.depth, self.in_string, self.escaped = 0, False, False

    def feed(self, text: str) -> tuple[int, bool]:
        """(characters that belong to the value, whether it ended there)."""
        for i, c in enumerate(text):
            if self.kind is None:
                if c in " \t\r\n":
                    continue
                self.kind = "container" if c in "{[" else "string" if c == '"' else "scalar"
                self.depth, self.in_string = (1, False) if self.kind == "container" else (0, self.kind == "string")
            elif self.kind == "scalar":
                if c in ",}]; \t\r\n":
                    return i, True
            elif self.in_string:
                if self.escaped:
                    self.escaped = False
                elif c == "\\":
                    self.escaped = True
                elif c == '"':
                    self.in_string = False
                    if self.kind == "string":
                        return i + 1, True
            elif c == '"':
                self.in_string = True
            elif c in "{[":
                self.depth += 1
            elif c in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1, True
        return len(text), False
