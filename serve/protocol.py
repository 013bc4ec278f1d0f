"""OpenAI's request and response shapes, mapped to and from the runtime's.

A request body becomes a `Plan` (prompt token ids, a GenerationConfig, how to answer)
before any response starts, so every bad value gets OpenAI's error JSON and a 4xx
status. An `Answer` turns the Steps of one generation into the response body or
into server-sent-event chunks.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import dataclass
from numbers import Integral, Real
from typing import Any, Callable

from edgellama.runtime.errors import BadArgumentError, BadModelFileError, ContextOverflowError
from edgellama.runtime.generate import GenerationConfig, Step
from edgellama.runtime.model import Model, make_config

from . import tools as toolkit

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length"}  # runtime -> OpenAI
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# Chat without max_tokens: OpenAI allows the rest of the context, but each generation's
# KV cache is allocated for prompt + max_tokens up front, so the default is capped.
CHAT_DEFAULT_MAX_TOKENS = 2048
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class APIError(Exception):
    """An error answered as OpenAI's {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(param: str | None, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass(frozen=True)
class Plan:
    chat: bool  # /v1/chat/completions, else /v1/completions
    prompt_ids: list[int]
    config: GenerationConfig
    stream: bool
    include_usage: bool  # stream_options.include_usage: a last chunk with usage
    top_logprobs: int | None  # None: no logprobs; k: the chosen token's and the k most likely
    tools: toolkit.ToolPlan | None = None  # tool calls to parse out of the answer


# --- requests -----------------------------------------------------------------------------


def parse_json(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}); send a JSON object") from None
    except RecursionError:
        raise APIError(400, "We could not parse the JSON body of your request (it nests too deeply); "
                            "send a JSON object") from None
    except ValueError as exc:  # an integer of more than 4,300 digits
        raise APIError(400, f"We could not parse the JSON body of your request ({exc}); send a JSON object") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def plan_chat(body: dict, model: Model, model_id: str) -> Plan:
    check_text(body)
    check_model(body, model_id)
    _reject_unsupported(body, chat=True)
    messages = _messages(body.get("messages"))
    try:
        tools = toolkit.parse_tools(body.get("tools"))
        choice = toolkit.parse_choice(body.get("tool_choice"), tools)
    except toolkit.ToolError as exc:
        raise invalid(exc.param, exc.message, exc.code) from None
    parallel = _bool(body, "parallel_tool_calls", default=True)
    response = _response_format(body, model)
    ids, constraint, tool_plan = _render(model, messages, tools, choice, parallel, response)
    logprobs = _bool(body, "logprobs")
    k = _int(body, "top_logprobs", 0, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"between 0 and {MAX_TOP_LOGPROBS}")
    if k and not logprobs:
        raise invalid("top_logprobs", "top_logprobs needs logprobs set to true")
    return _plan(True, body, model, ids, "messages", k if logprobs else None, default_max=CHAT_DEFAULT_MAX_TOKENS,
                 constraint=constraint, tools=tool_plan)


def plan_completion(body: dict, model: Model, model_id: str) -> Plan:
    check_text(body)
    check_model(body, model_id)
    _reject_unsupported(body, chat=False)
    ids = _prompt_ids(body.get("prompt"), model)
    response = _response_format(body, model)
    k = _int(body, "logprobs", None, lambda v: 0 <= v <= MAX_TOP_LOGPROBS, f"between 0 and {MAX_TOP_LOGPROBS}")
    return _plan(False, body, model, ids, "prompt", k, default_max=COMPLETION_DEFAULT_MAX_TOKENS,
                 constraint=response.grammar if response else None)


def check_text(body: Any) -> None:
    """Every string in the body (keys too) must be Unicode text: JSON's \\ud800 escapes can
    carry lone surrogates, which no tokenizer or encoder takes. 400 naming the field."""
    stack: list[tuple[Any, str]] = [(body, "")]
    while stack:
        value, path = stack.pop()
        if isinstance(value, str):
            if LONE_SURROGATE.search(value):
                raise invalid(path or None, f"{path or 'the body'} holds a lone UTF-16 surrogate "
                                            f"({LONE_SURROGATE.search(value)[0].encode('unicode_escape').decode()}), "
                                            "which is not text; send valid Unicode")
        elif isinstance(value, dict):
            for key, item in value.items():
                where = f"{path}.{key}" if path else str(key)
                if LONE_SURROGATE.search(key):
                    raise invalid(path or None, f"a key in {path or 'the body'} holds a lone UTF-16 surrogate, "
                                                "which is not text; send valid Unicode")
                stack.append((item, where))
        elif isinstance(value, list):
            stack.extend((item, f"{path}[{i}]") for i, item in enumerate(value))


def check_model(body: dict, model_id: str) -> None:
    """`model` may be left out (one model is served); if given, it must name it."""
    name = body.get("model")
    if name is not None and name != model_id:
        raise APIError(404, f"The model {name!r} does not exist; this server serves {model_id!r}",
                       param="model", code="model_not_found")


def _plan(chat: bool, body: dict, model: Model, ids: list[int], prompt_param: str,
          top_logprobs: int | None, default_max: int, constraint: Any = None,
          tools: toolkit.ToolPlan | None = None) -> Plan:
    max_new = _max_new(body, model, len(ids), prompt_param, default_max)
    stream = _bool(body, "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise invalid("stream_options", "stream_options must be an object")
    try:
        config = make_config(max_new_tokens=max_new, stop=_stops(body.get("stop")),
                             show_probs=0 if top_logprobs is None else max(1, top_logprobs), constraint=constraint,
                             **_sampling(body))
    except BadArgumentError as exc:  # whatever the runtime checks beyond the ranges below
        raise invalid(None, str(exc)) from None
    include_usage = stream and options.get("include_usage") is True
    return Plan(chat, ids, config, stream, include_usage, top_logprobs, tools)


def _max_new(body: dict, model: Model, n_prompt: int, prompt_param: str, default_max: int) -> int:
    """max_completion_tokens (the current name) wins over max_tokens (the old one); the
    prompt plus what is asked for must fit the context."""
    asked = None
    for name in ("max_completion_tokens", "max_tokens"):
        asked = _int(body, name, None, lambda v: v >= 1, "at least 1")
        if asked is not None:
            break
    room = model.context_length - n_prompt
    if room < 1 or (asked or 0) > room:
        wanted = n_prompt + (asked or 1)
        raise invalid(prompt_param if asked is None or room < 1 else name,
                      f"This model's maximum context length is {model.context_length} tokens. However, you "
                      f"requested {wanted} tokens ({n_prompt} in the {prompt_param}, {wanted - n_prompt} in the "
                      f"completion). Please reduce the length of the {prompt_param} or completion.",
                      code="context_length_exceeded")
    return asked or min(default_max, room)


# OpenAI's fields (and llama.cpp's / vLLM's top_k, min_p, repetition_penalty) -> SamplingParams.
_SAMPLING: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= 2, "between 0 and 2"),
    "top_p": (lambda v: 0 < v <= 1, "greater than 0 and at most 1"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "between -2 and 2"),
    "min_p": (lambda v: 0 <= v < 1, "at least 0 and below 1"),
    "repetition_penalty": (lambda v: 1e-4 <= v <= 1e4, "between 0.0001 and 10000"),
}
_DEFAULTS = {"temperature": 1.0}  # OpenAI samples at temperature 1 unless told otherwise
GREEDY_BELOW = 1e-5  # a temperature below this is greedy (as vLLM's): logits / 1e-308 overflow


def _sampling(body: dict) -> dict:
    out = {}
    for name, (ok, allowed) in _SAMPLING.items():
        value = _number(body, name, _DEFAULTS.get(name), ok, allowed)
        if value is not None:
            out[name] = 0.0 if name == "temperature" and value < GREEDY_BELOW else value
    top_k = _int(body, "top_k", None, lambda v: v >= 0, "at least 0 (0 = off)")
    if top_k is not None:
        out["top_k"] = top_k
    seed = _int(body, "seed", None, lambda v: 0 <= v < 2**64, "between 0 and 2**64 - 1")
    if seed is not None:
        out["seed"] = seed
    return out


def _stops(stop: Any) -> tuple[str, ...]:
    stops = [stop] if isinstance(stop, str) else stop if stop is not None else []
    if not isinstance(stops, list) or any(not isinstance(s, str) or not s for s in stops):
        raise invalid("stop", f"stop must be a non-empty string or a list of them, got {stop!r:.80}")
    if len(stops) > MAX_STOP_STRINGS:
        raise invalid("stop", f"stop holds {len(stops)} strings; at most {MAX_STOP_STRINGS} are allowed")
    return tuple(stops)


# Fields whose non-default values would change the answer in ways not served here.
_UNSUPPORTED: dict[str, Callable[[Any], bool]] = {
    "n": lambda v: v in (None, 1),
    "best_of": lambda v: v in (None, 1),
    "echo": lambda v: v in (None, False),
    "suffix": lambda v: v in (None, ""),
    "logit_bias": lambda v: not v,
    "functions": lambda v: not v,  # the old names of tools / tool_choice
    "function_call": lambda v: v in (None, "none"),
}
_UNSUPPORTED_COMPLETIONS: dict[str, Callable[[Any], bool]] = {  # chat only
    "tools": lambda v: not v,
    "tool_choice": lambda v: v in (None, "none"),
}


def _reject_unsupported(body: dict, chat: bool) -> None:
    table = _UNSUPPORTED if chat else {**_UNSUPPORTED, **_UNSUPPORTED_COMPLETIONS}
    for name, is_default in table.items():
        if not is_default(body.get(name)):
            raise invalid(name, f"{name}={body[name]!r:.80} is not supported by this server; leave it out",
                          code="unsupported_parameter")


def _messages(messages: Any) -> list[dict]:
    """OpenAI messages -> [{"role", "content": str, ...}] for the chat template: text parts
    are joined, "developer" is a system message; assistant messages keep their tool_calls
    (arguments as sent: a string), tool messages their tool_call_id, which must answer a
    call of an earlier assistant message."""
    if not isinstance(messages, list) or not messages:
        raise invalid("messages", "messages must be a non-empty list of {role, content} objects",
                      code="missing_required_parameter" if messages is None else "invalid_value")
    out, call_ids = [], set()
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if not isinstance(role, str) or role not in ROLES:
            raise invalid(f"messages[{i}].role", f"messages[{i}]: role must be one of {', '.join(ROLES)}, "
                                                 f"got {role!r:.40}")
        message = {"role": ROLES[role], "content": _content(m.get("content"), i, role)}
        if role == "assistant" and m.get("tool_calls"):
            message["tool_calls"] = _tool_calls(m["tool_calls"], i)
            call_ids.update(c["id"] for c in message["tool_calls"])
        elif role == "tool":
            call_id = m.get("tool_call_id")
            if not isinstance(call_id, str):
                raise invalid(f"messages[{i}].tool_call_id", f"messages[{i}]: a tool message needs the tool_call_id "
                                                             "(a string) of the call it answers",
                              code="missing_required_parameter" if call_id is None else "invalid_type")
            if call_id not in call_ids:
                raise invalid(f"messages[{i}].tool_call_id",
                              f"messages[{i}]: tool_call_id {call_id!r:.80} answers no tool call of an earlier "
                              "assistant message")
            message["tool_call_id"] = call_id
        out.append(message)
    return out


def _tool_calls(calls: Any, i: int) -> list[dict]:
    """An assistant message's tool_calls, checked: [{id, type: function, function: {name, arguments}}]."""
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise invalid(where, f"{where} must be a list of tool calls", code="invalid_type")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict):
            raise invalid(at, f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                              f"\"arguments\"}}}}")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise invalid(f"{at}.id", f"{at}.id must be a non-empty string", code="invalid_type")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise invalid(f"{at}.function.name", f"{at}.function.name must be a non-empty string",
                          code="invalid_type")
        arguments = fn.get("arguments", "{}")
        if isinstance(arguments, dict):  # some clients send the object itself
            arguments = json.dumps(arguments, ensure_ascii=False)
        if not isinstance(arguments, str):
            raise invalid(f"{at}.function.arguments", f"{at}.function.arguments must be a JSON string",
                          code="invalid_type")
        out.append({"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": arguments}})
    return out


def _content(content: Any, i: int, role: str) -> str:
    if isinstance(content, str):
        return content
    if content is None and role == "assistant":
        return ""
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise invalid(f"messages[{i}].content",
                  f"messages[{i}].content must be a string or a list of text parts ({{\"type\": \"text\", "
                  f"\"text\": ...}}); images, audio and files are not supported")


@dataclass(frozen=True)
class ResponseFormat:
    grammar: Any  # constrain.Grammar
    schema: Any  # the JSON schema a text answer follows (None: a grammar, not a schema)
    param: str  # the field it came from


def _response_format(body: dict, model: Model) -> ResponseFormat | None:
    """response_format (OpenAI's text / json_object / json_schema), or llama-server's
    json_schema (a schema) or grammar (GBNF or Lark) fields: at most one of them."""
    from edgellama.runtime.constrain import Grammar

    given = [name for name in ("json_schema", "grammar") if body.get(name) is not None]
    rf = body.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict):
            raise invalid("response_format", "response_format must be an object such as {\"type\": \"json_object\"}",
                          code="invalid_type")
        kind = rf.get("type")
        if kind not in ("text", "json_object", "json_schema"):
            raise invalid("response_format.type", f"response_format.type must be text, json_object or json_schema, "
                                                  f"got {kind!r:.40}",
                          code="missing_required_parameter" if kind is None else "invalid_value")
        if kind != "text":
            given.insert(0, "response_format")
    if len(given) > 1:
        raise invalid(given[1], f"{' and '.join(given)} each constrain the output; give one")
    if not given:
        return None

    def compiled(grammar: Any, schema: Any, param: str) -> ResponseFormat:
        try:
            grammar = grammar() if callable(grammar) else grammar
            grammar.check(model)
        except BadArgumentError as exc:
            raise invalid(param, str(exc)) from None
        return ResponseFormat(grammar, schema, param)

    if given[0] == "grammar":
        text = body["grammar"]
        if not isinstance(text, str):
            raise invalid("grammar", "grammar must be a string (GBNF or Lark)", code="invalid_type")
        return compiled(lambda: Grammar.lark(text), None, "grammar")
    if given[0] == "json_schema":
        return _schema(body["json_schema"], "json_schema", compiled)
    if rf["type"] == "json_object":
        if rf.get("schema") is not None:  # llama-server's {"type": "json_object", "schema": {...}}
            return _schema(rf["schema"], "response_format.schema", compiled)
        return compiled(Grammar.json, {"type": "object"}, "response_format")
    spec = rf.get("json_schema")
    if not isinstance(spec, dict):
        raise invalid("response_format.json_schema", "response_format.json_schema must be an object: "
                                                      "{\"name\", \"schema\", \"strict\"}",
                      code="missing_required_parameter" if spec is None else "invalid_type")
    name = spec.get("name")
    if not isinstance(name, str) or not SCHEMA_NAME.match(name):
        raise invalid("response_format.json_schema.name", "response_format.json_schema.name must be 1 to 64 "
                      f"letters, digits, underscores or dashes, got {name!r:.80}",
                      code="missing_required_parameter" if name is None else "invalid_value")
    for field, kind in (("strict", bool), ("description", str)):
        if spec.get(field) is not None and not isinstance(spec[field], kind):
            allowed = "true or false" if kind is bool else "a string"
            raise invalid(f"response_format.json_schema.{field}",
                          f"response_format.json_schema.{field} must be {allowed}", code="invalid_type")
    if spec.get("schema") is None:  # OpenAI's schema is optional: any JSON object
        return compiled(Grammar.json, {"type": "object"}, "response_format.json_schema")
    return _schema(spec["schema"], "response_format.json_schema.schema", compiled)


def _schema(schema: Any, param: str, compiled: Callable) -> ResponseFormat:
    from edgellama.runtime.constrain import Grammar

    if not isinstance(schema, (dict, bool)):
        raise invalid(param, f"{param} must be a JSON schema (an object), got {type(schema).__name__}",
                      code="invalid_type")
    return compiled(lambda: Grammar.json_schema(schema), schema, param)


def _render(model: Model, messages: list[dict], tools: list, choice: str, parallel: bool,
            response: ResponseFormat | None) -> tuple[list[int], Any, toolkit.ToolPlan | None]:
    """The prompt's token ids, the constraint, and what the answer parses (None: no tools)."""
    calling = choice != "none"
    history = any(m["role"] == "tool" or m.get("tool_calls") for m in messages)
    constraint = response.grammar if response else None
    if not calling and not history:
        return _rendered(lambda: model.render_chat(messages)), constraint, None
    if model.chat_template is None:
        raise invalid("messages", f"{model.folder}: this model has no chat template; use a plain prompt")
    fmt = toolkit.tool_format(model)
    shown = tools if calling else None
    chat, tools_arg = toolkit.prepare(fmt, messages, shown)

    def render(chat: list[dict]) -> list[int]:
        text = model.chat_template.render(chat, add_generation_prompt=True, tools=tools_arg)
        return model.encode(text, add_special_tokens=False)  # the template writes BOS itself

    try:
        ids = render(chat)
    except BadArgumentError as exc:
        if fmt.native or not shown:
            raise invalid("messages", str(exc)) from None
        chat = toolkit.section_in_user(chat, shown)  # a template that takes no system message
        ids = _rendered(lambda: render(chat))
    except BadModelFileError as exc:
        raise invalid("messages", str(exc)) from None
    if not calling:
        return ids, constraint, None
    if response is not None and response.schema is None:
        raise invalid(response.param, f"{response.param} cannot go with tools; use a response_format schema")
    _check_parameters(model, tools, choice)
    text, markers = toolkit.grammar(model, fmt, tools, choice, parallel,
                                    response.schema if response is not None else None)
    from edgellama.runtime.constrain import Grammar

    try:
        grammar = Grammar.lark(text)
        grammar.check(model)
    except BadArgumentError as exc:
        raise invalid("tools", f"the tools cannot be enforced: {exc}") from None
    return ids, grammar, toolkit.ToolPlan(fmt, markers)


def _rendered(render: Callable[[], list[int]]) -> list[int]:
    try:
        return render()
    except (BadArgumentError, BadModelFileError) as exc:
        raise invalid("messages", str(exc)) from None


def _check_parameters(model: Model, tools: list, choice: str) -> None:
    """Each tool's parameters compile on their own: a bad one is named with its path."""
    from edgellama.runtime.constrain import Grammar

    for i, tool in enumerate(tools):
        if choice not in ("auto", "required") and tool.name != choice:
            continue
        try:
            Grammar.json_schema(tool.parameters).check(model)
        except BadArgumentError as exc:
            raise invalid(f"tools[{i}].function.parameters", str(exc)) from None


def _prompt_ids(prompt: Any, model: Model) -> list[int]:
    """A string, a list of one string, a list of token ids, or a list of one such list."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        ids = model.encode(prompt)
    elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        bad = [t for t in prompt if not 0 <= t < model.vocab_size]
        if bad:
            raise invalid("prompt", f"prompt token id {bad[0]} is outside the vocabulary (0..{model.vocab_size - 1})")
        ids = list(prompt)
    elif isinstance(prompt, list):
        raise invalid("prompt", "only one prompt per request is supported; send a string or a list of token ids")
    else:
        raise invalid("prompt", f"prompt must be a string or a list of token ids, got {prompt!r:.80}",
                      code="missing_required_parameter" if prompt is None else "invalid_value")
    if not ids:
        raise invalid("prompt", "the prompt is empty; give at least one token of text")
    return ids


def _bool(body: dict, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise invalid(name, f"{name} must be true or false, got {value!r:.40}", code="invalid_type")
    return value


def _number(body: dict, name: str, default: float | None, ok: Callable[[float], bool], allowed: str) -> float | None:
    value = body.get(name)
    if value is None:
        return default
    try:
        number = float(value) if isinstance(value, Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # an integer beyond any float
        raise invalid(name, f"{name} must be {allowed}, got an integer of {len(str(abs(value)))} digits") from None
    if not math.isfinite(number):
        raise invalid(name, f"{name} must be a number, got {value!r:.40}", code="invalid_type")
    if not ok(number):
        raise invalid(name, f"{name} must be {allowed}, got {value!r:.40}")
    return number


def _int(body: dict, name: str, default: int | None, ok: Callable[[int], bool], allowed: str) -> int | None:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise invalid(name, f"{name} must be an integer, got {value!r:.40}", code="invalid_type")
    if not ok(value):
        raise invalid(name, f"{name} must be {allowed}, got {value!r}")
    return int(value)


def error_for(exc: Exception) -> APIError:
    """The runtime's user-facing errors as API errors (anything else is a server bug)."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (BadArgumentError, ContextOverflowError)):
        return APIError(400, str(exc))
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error")


# --- responses ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Done:
    """How one generation ended (runtime finish reason) and its token counts."""

    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens whose KV came from the prompt cache, not a prefill

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


class Answer:
    """Builds one request's response from the Steps it is fed: a whole body (`body`) or
    server-sent-event chunks (`head`, each `feed`, `tail`). With tools, the text goes
    through a CallParser: content deltas, then OpenAI's tool-call deltas (one with the
    call's index, id, type, name and arguments "", then argument fragments)."""

    def __init__(self, plan: Plan, model: Model, model_id: str):
        self.plan, self.model, self.model_id = plan, model, model_id
        self.id = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if plan.chat else "text_completion"
        self.pieces: list[str] = []
        self.tokens: list[dict] = []  # one logprob entry per generated token (with logprobs)
        self.offsets: list[int] = []  # where each token's text starts in the joined token texts
        self.parser = toolkit.CallParser(plan.tools.format) if plan.tools is not None else None
        self.content: list[str] = []  # with tools: the text that is not calls
        self._finished = False

    # ---- streaming ----
    def head(self) -> list[dict]:
        """Chat streams open with the assistant's role."""
        return [self._chunk({"role": "assistant", "content": ""})] if self.plan.chat else []

    def feed(self, step: Step) -> list[dict]:
        """Record a step; the chunks that carry it (none: nothing to send yet)."""
        self.pieces.append(step.text)
        scored = self.plan.top_logprobs is not None and step.token_id is not None
        if scored:
            self.offsets.append(self.offsets[-1] + len(self.tokens[-1]["token"]) if self.tokens else 0)
            self.tokens.append(self._logprob(step))
        logprobs = self._logprobs(len(self.tokens) - 1) if scored else None
        if self.parser is None:
            if not step.text and not scored:
                return []
            return [self._chunk({"content": step.text}, logprobs)]
        text = step.text
        if step.token_id is not None and step.token_id in self.plan.tools.markers:  # a special token: not in text
            text = self.plan.tools.markers[step.token_id] + text
        deltas = self._deltas(self.parser.feed(text))
        if not deltas and not scored:
            return []
        deltas = deltas or [{}]
        return [self._chunk(d) for d in deltas[:-1]] + [self._chunk(deltas[-1], logprobs)]

    def tail(self, done: Done) -> list[dict]:
        chunks = [self._chunk(d) for d in self._finish()]
        chunks.append(self._chunk({}, finish=self._finish_reason(done)))
        if self.plan.include_usage:
            chunks.append({**self._envelope(), "choices": [], "usage": done.usage()})
        return chunks

    def _finish(self) -> list[dict]:
        """The deltas held back by the tool-call parser (once)."""
        if self.parser is None or self._finished:
            return []
        self._finished = True
        return self._deltas(self.parser.finish())

    def _finish_reason(self, done: Done) -> str:
        reason = FINISH_REASONS[done.finish_reason]
        return "tool_calls" if reason == "stop" and self.parser is not None and self.parser.calls else reason

    def _deltas(self, events: list[tuple]) -> list[dict]:
        """CallParser events -> chat deltas: content merged, each call's start on its own,
        argument fragments merged per call."""
        out: list[dict] = []
        for event in events:
            if event[0] == "content":
                self.content.append(event[1])
                if out and "content" in out[-1]:
                    out[-1]["content"] += event[1]
                else:
                    out.append({"content": event[1]})
            elif event[0] == "call":
                _, index, call_id, name = event
                out.append({"tool_calls": [{"index": index, "id": call_id, "type": "function",
                                            "function": {"name": name, "arguments": ""}}]})
            else:
                _, index, text = event
                last = out[-1]["tool_calls"][0] if out and "tool_calls" in out[-1] else None
                if last is not None and last["index"] == index and "id" not in last:
                    last["function"]["arguments"] += text
                else:
                    out.append({"tool_calls": [{"index": index, "function": {"arguments": text}}]})
        return out

    def _chunk(self, delta: dict, logprobs: dict | None = None, finish: str | None = None) -> dict:
        if self.plan.chat:
            choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta.get("content", ""), "logprobs": logprobs, "finish_reason": finish}
        return {**self._envelope(), "choices": [choice]}

    def _envelope(self) -> dict:
        kind = self.object + ".chunk" if self.plan.chat else self.object
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    # ---- whole ----
    def body(self, done: Done) -> dict:
        text, finish = "".join(self.pieces), self._finish_reason(done)
        logprobs = self._logprobs(0) if self.plan.top_logprobs is not None else None
        if self.plan.chat:
            message = {"role": "assistant", "content": text, "refusal": None}
            if self.parser is not None:
                self._finish()
                calls = [{"id": c["id"], "type": "function",
                          "function": {"name": c["name"], "arguments": c["arguments"]}} for c in self.parser.calls]
                content = "".join(self.content)
                message["content"] = None if calls and not content else content
                if calls:
                    message["tool_calls"] = calls
                finish = self._finish_reason(done)
            choice = {"index": 0, "message": message, "logprobs": logprobs, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model_id,
                "choices": [choice], "usage": done.usage()}

    # ---- logprobs ----
    def _logprob(self, step: Step) -> dict:
        """One token under the distribution `--show-probs` shows (softmax of the raw logits)."""
        top = (step.top or [])[: self.plan.top_logprobs]
        return {**self._token(step.token_id, step.prob), "top_logprobs": [self._token(t, p) for t, p in top]}

    def _token(self, token_id: int, prob: float) -> dict:
        text = self.model.tokenizer.decode([token_id], skip_special_tokens=False)
        return {"token": text, "logprob": math.log(prob) if prob > 0 else -9999.0, "bytes": list(text.encode())}

    def _logprobs(self, start: int) -> dict:
        """Tokens from `start` on. Chat: {"content": entries}; completions: parallel lists."""
        entries = self.tokens[start:]
        if self.plan.chat:
            return {"content": entries, "refusal": None}
        return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries],
                "text_offset": self.offsets[start:]}
