"""Fuzzing every route of `edgellama serve` over real HTTP: a tiny random model behind a
Server on a free loopback port, sent requests that hypothesis builds from valid bodies
(streamed or not, with or without response_format, tools, tool_choice, a tool-call
history, logprobs, sampling options) with 0 to 4 fields swapped for wrong types, missing
values, huge numbers, NaN/Infinity literals, lone surrogates, odd message shapes, every
kind of response_format / tools / tool_choice; and invalid JSON, non-object JSON, deep
nesting, wrong content types, unknown paths and wrong methods. A parametrized list of
hand-picked edges runs too, each reported on its own.

For every request: the status is 200 or 4xx (never 5xx); a 4xx body is OpenAI's error
{"error": {"message": str, "type": str, "param": str|None, "code": str|None}}; a 200 body
is strict JSON of the route's shape, or (streamed) server-sent events each holding strict
JSON, none of them an error, ending with `data: [DONE]`; and /health still answers.

Requests are sent with http.client so the bytes are exactly what the strategy built (a
`\\ud800` escape in the JSON text, raw NaN, a 5,000-digit integer, bytes that are not
UTF-8). Valid bodies ask for at most 3 tokens, so each generation is cheap.

The unmarked tests run ~150 examples in all (derandomized: the same ones every run); the
`slow` ones run 1,000 more.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import urllib.parse
from dataclasses import dataclass, field

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from conftest import tiny_model_of_layout  # noqa: E402
from edgellama.runtime.contract import KVLayout  # noqa: E402
from edgellama.serve.server import Server, bind  # noqa: E402

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
MODEL_ID = "tiny-fuzz"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
JSON_CT = "application/json"
CONTEXT = 2048


def fuzz_settings(n: int) -> settings:
    return settings(max_examples=n, deadline=None, derandomize=True, database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much])


# --- the server -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # 2,048 positions: room for the tool-calling prompts (a tool section is ~700 of this tokenizer's tokens)
    model = tiny_model_of_layout(tmp_path_factory, KVLayout.SHARED, max_position_embeddings=CONTEXT)
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=2, model_id=MODEL_ID, log_level="critical").start()
    yield srv
    srv.stop()


# --- requests as bytes ----------------------------------------------------------------------


class Raw:
    """JSON text put into a body verbatim (NaN, 1e400, a 5,000-digit integer, ...)."""

    def __init__(self, text: str):
        self.text = text

    def __repr__(self) -> str:
        return f"Raw({self.text if len(self.text) < 40 else self.text[:20] + f'...({len(self.text)} chars)'})"


class _Omit:
    def __repr__(self) -> str:
        return "OMIT"


OMIT = _Omit()  # as a field's value: leave the field out


def to_json(value, ascii: bool = True) -> str:
    """JSON text for value; Raw pieces verbatim, OMIT fields left out. Python's json writes
    NaN/Infinity as those literals and (ascii) a lone surrogate as its \\uXXXX escape."""
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=ascii)}:{to_json(v, ascii)}"
                              for k, v in value.items() if v is not OMIT) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v, ascii) for v in value) + "]"
    return json.dumps(value, ensure_ascii=ascii)


def encode(value, transport: str) -> bytes:
    """ascii: \\uXXXX escapes; utf-8: raw UTF-8 (a lone surrogate becomes bytes that are not
    UTF-8); utf-16: what json.loads also accepts."""
    if transport == "ascii":
        return to_json(value).encode("ascii")
    text = to_json(value, ascii=False)
    return text.encode("utf-16" if transport == "utf-16" else "utf-8", "surrogatepass")


@dataclass(frozen=True)
class Req:
    method: str
    path: str
    body: bytes | None = None
    headers: tuple[tuple[str, str], ...] = (("Content-Type", JSON_CT),)
    label: str = field(default="", compare=False)

    def __repr__(self) -> str:
        body = None if self.body is None else (
            self.body if len(self.body) <= 600 else self.body[:300] + b"..." + self.body[-100:])
        extra = f", label={self.label!r}" if self.label else ""
        return f"Req({self.method} {self.path}, body={body!r}, headers={dict(self.headers)}{extra})"


def post(path: str, value, transport: str = "ascii", content_type: str | None = JSON_CT, label: str = "") -> Req:
    headers = (("Content-Type", content_type),) if content_type is not None else ()
    return Req("POST", path, encode(value, transport), headers, label)


# --- sending and checking -------------------------------------------------------------------


def send(server, req: Req, timeout: float = 60) -> tuple[int, dict, bytes]:
    host, port = server.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.putrequest(req.method, req.path, skip_accept_encoding=True)
        for name, value in req.headers:
            conn.putheader(name, value)
        if req.body is not None:
            conn.putheader("Content-Length", str(len(req.body)))
        try:
            conn.endheaders(req.body)
        except (BrokenPipeError, ConnectionResetError):  # answered (413) before the whole body was read
            pass
        r = conn.getresponse()
        try:
            data = r.read()
        except http.client.IncompleteRead as exc:
            raise AssertionError(f"{req!r}: status {r.status}, then the response was cut off after "
                                 f"{exc.partial[-400:]!r}") from None
        return r.status, {k.lower(): v for k, v in r.getheaders()}, data
    finally:
        conn.close()


def _no_constants(name: str):
    raise ValueError(f"{name} is not JSON")


def strict_json(data: bytes):
    """JSON as the spec has it: UTF-8, no NaN / Infinity."""
    return json.loads(data.decode("utf-8"), parse_constant=_no_constants)


def check_error(status: int, headers: dict, data: bytes, req: Req) -> None:
    assert headers.get("content-type", "").startswith("application/json"), \
        f"{req!r} -> {status} with content-type {headers.get('content-type')!r}: {data[:400]!r}"
    body = strict_json(data)
    assert isinstance(body, dict) and set(body) == {"error"}, f"{req!r} -> {status}: not OpenAI's error: {body!r:.400}"
    error = body["error"]
    assert isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}, \
        f"{req!r} -> {status}: not OpenAI's error: {body!r:.400}"
    assert isinstance(error["message"], str) and error["message"], f"{req!r} -> {status}: {body!r:.400}"
    assert isinstance(error["type"], str) and error["type"], f"{req!r} -> {status}: {body!r:.400}"
    assert error["param"] is None or isinstance(error["param"], str), f"{req!r} -> {status}: {body!r:.400}"
    assert error["code"] is None or isinstance(error["code"], str), f"{req!r} -> {status}: {body!r:.400}"


def check_completion(body, chat: bool, req: Req) -> None:
    assert isinstance(body, dict) and body.get("object") == ("chat.completion" if chat else "text_completion"), \
        f"{req!r} -> 200: {body!r:.400}"
    (choice,) = body["choices"]
    if chat:
        message = choice["message"]
        assert message["role"] == "assistant" and (message["content"] is None or isinstance(message["content"], str))
    else:
        assert isinstance(choice["text"], str)
    assert choice["finish_reason"] in ("stop", "length", "tool_calls"), f"{req!r} -> 200: {body!r:.400}"
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def check_stream(data: bytes, chat: bool, req: Req) -> None:
    text = data.decode("utf-8")
    assert text.endswith("\n\n"), f"{req!r} -> 200 stream not ending in a blank line: {text[-300:]!r}"
    events = text[:-2].split("\n\n")
    assert events and events[-1] == "data: [DONE]", f"{req!r} -> 200 stream without [DONE]: {text[-300:]!r}"
    assert all(e.startswith("data: ") for e in events), f"{req!r} -> 200 stream: {text[:600]!r}"
    chunks = [strict_json(e[len("data: "):].encode()) for e in events[:-1]]
    errors = [c for c in chunks if "error" in c]
    assert not errors, f"{req!r} -> 200 stream holding an error event: {errors[0]!r:.400}"
    kind = "chat.completion.chunk" if chat else "text_completion"
    assert chunks and all(c["object"] == kind for c in chunks), f"{req!r} -> 200 stream: {text[:600]!r}"


def check_ok(headers: dict, data: bytes, req: Req) -> None:
    path = urllib.parse.urlsplit(req.path).path
    if headers.get("content-type", "").startswith("text/event-stream"):
        assert path in (CHAT, COMPLETIONS), f"{req!r} -> 200 event stream"
        check_stream(data, path == CHAT, req)
        return
    body = strict_json(data)
    if path in (CHAT, COMPLETIONS):
        check_completion(body, path == CHAT, req)
    elif path == "/v1/models":
        assert body["object"] == "list" and [m["id"] for m in body["data"]] == [MODEL_ID], f"{req!r}: {body!r:.400}"
    elif path.startswith("/v1/models/"):
        assert body["id"] == MODEL_ID and body["object"] == "model", f"{req!r}: {body!r:.400}"
    elif path == "/health":
        assert body["status"] == "ok", f"{req!r}: {body!r:.400}"
    else:
        raise AssertionError(f"{req!r} -> 200 on a path that is no route: {body!r:.400}")


def check(server, req: Req) -> None:
    status, headers, data = send(server, req)
    assert status < 500, f"{req!r} -> {status}: {data[:1000]!r}"
    assert status == 200 or 400 <= status < 500, f"{req!r} -> {status} {headers}: {data[:400]!r}"
    if req.method != "HEAD":
        if status == 200:
            check_ok(headers, data, req)
        else:
            check_error(status, headers, data, req)
    status, _, data = send(server, Req("GET", "/health", headers=()), timeout=30)
    assert status == 200 and strict_json(data)["status"] == "ok", f"after {req!r}: /health -> {status}: {data[:300]!r}"


# --- values ---------------------------------------------------------------------------------

LONE_SURROGATES = ["\ud800", "\udfff", "a\ud800b", "\udc00\ud800", "\ud83d", "x\udbff"]
ODD_TEXT = ["", " ", "\x00", "</s>", "<s>", "<user>", "{{ 7*7 }}", "{% endfor %}", "\u2028", "😀", "é",
            "The quick brown fox " * 500]  # the last overflows the tiny model's context
TEXT = st.one_of(st.text(max_size=12), st.sampled_from(LONE_SURROGATES), st.sampled_from(ODD_TEXT),
                 st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF), min_size=1, max_size=2))
RAW_NUMBERS = [Raw(t) for t in ("NaN", "Infinity", "-Infinity", "1e400", "-1e400", "1e-400", "-0", "1E308",
                                "1" * 5000, "-" + "9" * 4400, "0.1e99999")]
NUMBERS = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 0.5, -0.5, 1e308, -1e308, 2**31, 2**53 + 1, 2**63 - 1, 2**63, -2**63,
                     2**64, -2**64 - 1, 10**400, -(10**400), math.nan, math.inf, -math.inf, -0.0, 1.0, 2.0]),
    st.sampled_from([5e-324, 1e-308, 1e-300, 1e-45, 1e-10, 0.9999999999999999, 1.9999999999999998]),  # in range
    st.sampled_from(RAW_NUMBERS), st.integers(), st.floats())
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
ANY = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(TEXT, inner, max_size=3),
                   max_leaves=6)


def maybe(*strategies) -> st.SearchStrategy:
    """Leave the field out, one of the given values, or any JSON at all."""
    return st.one_of(st.just(OMIT), *strategies, ANY)


SCHEMAS = st.one_of(st.sampled_from([
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
    {"type": "object", "properties": {"city": {"type": "string"}, "n": {"type": "number"}},
     "required": ["city"], "additionalProperties": False},
    {"type": "string"}, {"type": "array", "items": {"type": "boolean"}, "maxItems": 2}, {"enum": [1, "a", None]},
    {}, True, False, {"type": "integer", "minimum": 5, "maximum": 3}, {"anyOf": [{"type": "string"}, {"type": "null"}]},
    {"type": "nonsense"}, {"type": "string", "pattern": "[a-z]+"}, {"type": "string", "pattern": "("},
    {"type": "string", "maxLength": 0}, {"$ref": "#"}, {"$ref": "#/$defs/x", "$defs": {"x": {"type": "string"}}},
    {"$ref": "#/$defs/missing"}, {"type": "object", "properties": {"next": {"$ref": "#"}}, "required": ["next"]},
    {"const": "\ud800"}, {"type": "number", "multipleOf": 0}, {"format": "date-time", "type": "string"},
]), ANY)
RESPONSE_FORMATS = st.one_of(
    st.sampled_from([{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}, {"type": "json"},
                     {"type": "regex"}, {}, {"type": None}, {"type": "text", "extra": 1}, "json_object", "text"]),
    st.fixed_dictionaries({"type": st.just("json_schema"),
                           "json_schema": maybe(st.fixed_dictionaries({"name": maybe(TEXT), "schema": maybe(SCHEMAS),
                                                                       "strict": maybe(st.booleans())}))}),
    st.fixed_dictionaries({"type": st.just("json_object"), "schema": SCHEMAS}),
    st.fixed_dictionaries({"type": ANY}),
)
GRAMMARS = st.one_of(st.sampled_from([
    'root ::= "yes" | "no"', 'start: "a"+', 'start: /[0-9]+/', "", "root ::= (", "start: start", "start: \"\"",
    'root ::= [a-z]{2,3}', "%import common.NUMBER\nstart: NUMBER", "root ::= x", "start: %json {}",
    'start: %json {"type": "integer"}', "\ud800", "?start: \"a\" | ", 'root ::= "a" root']), TEXT, ANY)
TOOL_NAMES = st.one_of(st.sampled_from(["get_weather", "f", "a-b_c", "", "has space", "x" * 200, "\ud800", "ünï"]),
                       ANY)
TOOL = st.one_of(
    st.fixed_dictionaries({"type": st.just("function"),
                           "function": st.fixed_dictionaries({"name": TOOL_NAMES}, optional={
                               "description": TEXT, "parameters": SCHEMAS, "strict": st.booleans()})}),
    st.sampled_from([{"type": "function"}, {"type": "code_interpreter"}, {"type": "function", "function": None},
                     {"function": {"name": "f"}}]),
    ANY)
TOOLS = st.one_of(st.just([]), st.lists(TOOL, min_size=1, max_size=2), ANY)
TOOL_CHOICES = st.one_of(
    st.sampled_from(["none", "auto", "required", "any", "", "NONE",
                     {"type": "function", "function": {"name": "get_weather"}},
                     {"type": "function", "function": {"name": "missing"}}, {"type": "function"},
                     {"type": "function", "function": {}}, {"type": "allowed_tools"}]),
    st.fixed_dictionaries({"type": st.just("function"), "function": st.fixed_dictionaries({"name": TOOL_NAMES})}),
    ANY)
TOOL_CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}

ROLES = st.one_of(st.sampled_from(["user", "user", "system", "developer", "assistant", "tool", "function", "USER",
                                   "", "model", "ipython"]),
                  st.lists(TEXT, max_size=2), st.dictionaries(TEXT, TEXT, max_size=2), ANY)
PARTS = st.one_of(
    st.fixed_dictionaries({"type": st.just("text"), "text": TEXT}),
    st.sampled_from([{"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
                     {"type": "input_audio", "input_audio": {"data": "", "format": "wav"}},
                     {"type": "file", "file": {"file_id": "f"}}, {"type": "refusal", "refusal": "no"},
                     {"type": "text"}, {"text": "no type"}, {"type": "text", "text": None}]),
    st.fixed_dictionaries({"type": ANY, "text": ANY}), ANY)
CONTENTS = st.one_of(TEXT, st.none(), st.lists(PARTS, max_size=3), ANY)
MESSAGE = st.one_of(
    st.fixed_dictionaries({"role": ROLES, "content": maybe(CONTENTS)}, optional={
        "name": maybe(TEXT), "tool_calls": maybe(st.just([TOOL_CALL]), st.just([]), st.lists(ANY, max_size=2)),
        "tool_call_id": maybe(TEXT), "refusal": ANY, "extra": ANY}),
    st.sampled_from([{"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                     {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                     {"role": "tool", "content": [{"type": "text", "text": "sunny"}]},
                     {"role": "function", "name": "get_weather", "content": "sunny"},
                     {"role": "assistant", "content": None}, {"role": "user"}, {"content": "no role"}]),
    ANY)
MESSAGES = st.one_of(st.lists(MESSAGE, min_size=1, max_size=3), st.just([]), ANY)
GOOD_MESSAGES = st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["user", "system", "assistant", "developer"]),
    "content": st.sampled_from(["The quick brown fox", "def f(x):", "Hi", "", "lazy dog"])}), min_size=1, max_size=2)

MAX_TOKENS = maybe(st.integers(1, 3), NUMBERS,
                   st.sampled_from([0, -1, CONTEXT - 1, CONTEXT, CONTEXT + 1, 2**31, 2**63, -2**63, 10**400, 1.0, 2.5]))
COMMON_FIELDS = {
    "model": maybe(st.sampled_from([MODEL_ID, "gpt-4o", "", MODEL_ID + " ", MODEL_ID.upper()]), TEXT),
    "max_tokens": MAX_TOKENS,
    "max_completion_tokens": MAX_TOKENS,
    "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())})),
    "stop": maybe(TEXT, st.lists(TEXT, max_size=3), st.lists(st.just("x"), min_size=17, max_size=17),
                  st.just([]), NUMBERS),
    **{name: maybe(NUMBERS) for name in ("temperature", "top_p", "presence_penalty", "frequency_penalty",
                                         "min_p", "repetition_penalty", "top_k", "seed")},
    "n": maybe(st.sampled_from([1, 2, 0, -1, None, 1.0])),
    "logit_bias": maybe(st.sampled_from([{}, {"50": 100}, {"abc": 1}, {"5": math.nan}, None])),
    "response_format": maybe(RESPONSE_FORMATS),
    "tools": maybe(TOOLS),
    "tool_choice": maybe(TOOL_CHOICES),
    "parallel_tool_calls": maybe(st.booleans()),
    "functions": maybe(st.just([{"name": "f", "parameters": {"type": "object"}}])),
    "function_call": maybe(st.sampled_from(["none", "auto", {"name": "f"}])),
    "json_schema": maybe(SCHEMAS),  # llama-server's fields
    "grammar": maybe(GRAMMARS),
    "user": maybe(TEXT), "metadata": ANY, "store": ANY, "service_tier": ANY, "reasoning_effort": ANY,
}
CHAT_FIELDS = {
    **COMMON_FIELDS,
    "messages": maybe(MESSAGES),
    "logprobs": maybe(st.booleans()),
    "top_logprobs": maybe(st.integers(-1, 25), NUMBERS),
    "modalities": ANY, "audio": ANY, "prediction": ANY, "web_search_options": ANY,
}
PROMPTS = st.one_of(
    TEXT, st.lists(st.integers(-3, 330), max_size=4), st.lists(st.lists(st.integers(0, 299), max_size=3), max_size=2),
    st.lists(TEXT, min_size=1, max_size=2),
    st.sampled_from([[], [[]], [""], [True, False], [1.0, 2.0], [2**63], [-2**63], list(range(300)) * 7,
                     [[1, 2], "a"]]),
    ANY)
COMPLETION_FIELDS = {
    **COMMON_FIELDS,
    "prompt": maybe(PROMPTS),
    "logprobs": maybe(st.integers(-1, 25), st.booleans(), NUMBERS),
    "echo": maybe(st.booleans()),
    "suffix": maybe(TEXT),
    "best_of": maybe(st.sampled_from([1, 2, 0, None])),
}
CONTENT_TYPES = st.sampled_from([JSON_CT, JSON_CT, JSON_CT, JSON_CT, None, "text/plain",
                                 "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                                 "application/json; charset=latin-1", "application/xml", "*/*", "garbage"])
TRANSPORTS = st.sampled_from(["ascii", "ascii", "ascii", "utf-8", "utf-16"])


# Fields swapped more often than the rest: the shapes with the most ways to be wrong.
OFTEN = ["messages", "messages", "messages", "message", "message", "message", "prompt", "prompt", "prompt",
         "response_format", "response_format", "tools", "tools", "tool_choice", "tool_choice"]


@st.composite
def generation_requests(draw, path: str, base: st.SearchStrategy, fields: dict) -> Req:
    """A valid body (at most 3 tokens) with 0 to 4 fields swapped (or one odd message added),
    plus sometimes an unknown field."""
    body = draw(base)
    names = sorted(fields) + [name for name in OFTEN if name in fields or (name == "message" and "messages" in body)]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(names))
        if name == "message":  # one odd message among good ones
            messages = list(body["messages"]) if isinstance(body.get("messages"), list) else []
            messages.insert(draw(st.integers(0, len(messages))), draw(MESSAGE))
            body["messages"] = messages
        else:
            body[name] = draw(fields[name])
    if draw(st.integers(0, 9)) == 0:
        body[draw(TEXT)] = draw(ANY)
    return post(path, body, draw(TRANSPORTS), draw(CONTENT_TYPES))


# Valid bodies: each option is left out (first: what examples shrink to) or given a good value.
VALID_OPTIONS = {
    "stream": st.sampled_from([OMIT, False, True, True]),
    "stream_options": st.sampled_from([OMIT, {"include_usage": True}, {"include_usage": False}]),
    "temperature": st.sampled_from([OMIT, 0, 0.7, 2]),
    "top_p": st.sampled_from([OMIT, 0.9, 1]),
    "top_k": st.sampled_from([OMIT, 0, 5]),
    "min_p": st.sampled_from([OMIT, 0.1]),
    "presence_penalty": st.sampled_from([OMIT, -2, 1.5]),
    "frequency_penalty": st.sampled_from([OMIT, 2]),
    "repetition_penalty": st.sampled_from([OMIT, 1.3]),
    "seed": st.sampled_from([OMIT, 0, 2**64 - 1]),
    "stop": st.sampled_from([OMIT, "\n", ["a", "b"], "The"]),
    "n": st.sampled_from([OMIT, 1]),
    "user": st.sampled_from([OMIT, "me"]),
}
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
GOOD_RESPONSE_FORMATS = st.sampled_from([
    OMIT, OMIT, {"type": "text"}, {"type": "json_object"}, {"type": "json_schema", "json_schema": {"name": "a"}},
    {"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA, "strict": True}},
    {"type": "json_schema", "json_schema": {"name": "b-1", "schema": {"type": "string", "maxLength": 3}}},
    {"type": "json_schema", "json_schema": {"name": "c", "schema": {"enum": ["x", 2, None]}}}])
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "time_now"}}
GOOD_TOOLS = st.sampled_from([OMIT, OMIT, [WEATHER], [WEATHER, CLOCK], []])
GOOD_TOOL_CHOICES = st.sampled_from([OMIT, "auto", "none", "required",
                                     {"type": "function", "function": {"name": "get_weather"}}])
TOOL_HISTORY = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]


@st.composite
def valid_chat(draw) -> dict:
    body = {"messages": draw(st.one_of(GOOD_MESSAGES, st.just(TOOL_HISTORY))), "max_tokens": draw(st.integers(1, 3)),
            **{name: draw(values) for name, values in VALID_OPTIONS.items()},
            "response_format": draw(GOOD_RESPONSE_FORMATS), "tools": draw(GOOD_TOOLS)}
    if isinstance(body["tools"], list) and body["tools"]:
        body["tool_choice"] = draw(GOOD_TOOL_CHOICES)
        body["parallel_tool_calls"] = draw(st.sampled_from([OMIT, True, False]))
    if draw(st.booleans()):
        body["logprobs"], body["top_logprobs"] = True, draw(st.sampled_from([OMIT, 0, 3]))
    if body["stream"] is not True:
        body["stream_options"] = OMIT
    return body


@st.composite
def valid_completion(draw) -> dict:
    body = {"prompt": draw(st.sampled_from(["The quick", "def f(x):", [5, 6, 7], ["lazy"], [[8, 9]]])),
            "max_tokens": draw(st.integers(1, 3)), **{name: draw(values) for name, values in VALID_OPTIONS.items()},
            "logprobs": draw(st.sampled_from([OMIT, 0, 2])), "echo": draw(st.sampled_from([OMIT, False])),
            "response_format": draw(GOOD_RESPONSE_FORMATS)}
    if body["response_format"] is OMIT:  # llama-server's fields instead
        body.update(draw(st.sampled_from([{}, {"json_schema": SCHEMA}, {"grammar": 'root ::= "yes" | "no"'},
                                          {"grammar": "start: /[a-z]+/"}])))
    if body["stream"] is not True:
        body["stream_options"] = OMIT
    return body


CHAT_BASE, COMPLETION_BASE = valid_chat(), valid_completion()
CHAT_REQUESTS = generation_requests(CHAT, CHAT_BASE, CHAT_FIELDS)
COMPLETION_REQUESTS = generation_requests(COMPLETIONS, COMPLETION_BASE, COMPLETION_FIELDS)


def _nested(depth: int) -> str:
    return "[" * depth + "]" * depth


JUNK_BODIES = [b"", b"{", b"}", b"nul", b"{'messages': []}", b'{"messages": [}', b"\xff\xfe", b"\x00",
               b"\xef\xbb\xbf{}",
               b'{"a":1}{"b":2}', b'{"messages": []} trailing', b'{"max_tokens": 1,}', b"\xed\xa0\x80",
               b'{"prompt": "\xed\xa0\x80"}', b'{"prompt": "\\ud800"}', b'{"prompt": "\\u"}', b'{"prompt": "\\x41"}',
               b'{"prompt": 01}', b'{"prompt": "a\nb"}', b'{"prompt"\x00: "a"}', b"\x1f\x8b\x08\x00"]


@st.composite
def raw_requests(draw) -> Req:
    """Bodies that are not a JSON object: broken JSON, other JSON values, deep nesting, huge literals."""
    path = draw(st.sampled_from([CHAT, COMPLETIONS]))
    kind = draw(st.sampled_from(["junk", "binary", "cut", "value", "nested", "literal"]))
    if kind == "junk":
        body = draw(st.sampled_from(JUNK_BODIES))
    elif kind == "binary":
        body = draw(st.binary(max_size=40))
    elif kind == "cut":
        whole = draw(CHAT_REQUESTS if path == CHAT else COMPLETION_REQUESTS).body
        body = whole[:draw(st.integers(0, max(0, len(whole) - 1)))]
    elif kind == "value":  # JSON, but not an object
        body = encode(draw(st.one_of(SCALARS, st.lists(ANY, max_size=3), st.sampled_from(RAW_NUMBERS))),
                      draw(TRANSPORTS))
    elif kind == "nested":
        depth = draw(st.sampled_from([50, 1000, 100_000]))
        inner = draw(st.sampled_from(["messages", "prompt", "stop", "tools", "metadata"]))
        body = (f'{{"{inner}": {_nested(depth)}, "max_tokens": 1}}' if draw(st.booleans()) else _nested(depth)).encode()
    else:  # a field holding a literal Python's json refuses or turns into inf
        name = draw(st.sampled_from(["max_tokens", "temperature", "seed", "top_logprobs", "prompt", "n", "stop"]))
        base = {"messages": [{"role": "user", "content": "Hi"}]} if path == CHAT else {"prompt": "Hi"}
        body = encode({**base, "max_tokens": 1, name: draw(st.sampled_from(RAW_NUMBERS))}, "ascii")
    return Req("POST", path, body, ((("Content-Type", draw(CONTENT_TYPES) or JSON_CT)),), label=kind)


def _quoted(text: str) -> str:
    return urllib.parse.quote(text.encode("utf-8", "surrogatepass"), safe="/")


ODD_PATHS = ["/", "/v1", "/v1/", "/v1/models/", "/v1/models//x", "/v1/chat", "/v1/chat/completions/",
             "/v1/completions/",
             "/health/", "/HEALTH", "/v1/models/%ED%A0%80", "/v1/models/%FF", "/v1/models/..%2f..%2fetc",
             "/v1/models/" + MODEL_ID + "/extra", "/v1/models/" + MODEL_ID + "?x=1", "/v1/models?limit=-1",
             "/v1/embeddings", "/v1/responses", "/v2/models", "//health", "/health?x=%00", "/v1/models/%00",
             "/v1/chat/completions?stream=true", "/docs", "/openapi.json", "/v1/../health", "*"]
GET_PATHS = st.one_of(
    st.sampled_from(["/v1/models", "/v1/models/" + MODEL_ID, "/health", CHAT, COMPLETIONS]),
    st.sampled_from(ODD_PATHS),
    TEXT.map(lambda t: "/v1/models/" + _quoted(t)),
    TEXT.map(lambda t: "/" + _quoted(t)))
METHODS = st.sampled_from(["GET", "GET", "GET", "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "FOO"])


@st.composite
def other_requests(draw) -> Req:
    """Every route by every method, and paths that are no route."""
    method, path = draw(METHODS), draw(GET_PATHS)
    body = None if method in ("GET", "HEAD") and draw(st.booleans()) else encode(draw(ANY), "ascii")
    return Req(method, path, body, (("Content-Type", JSON_CT),) if body is not None else ())


# --- the tests ------------------------------------------------------------------------------


def _fuzz(requests: st.SearchStrategy, n: int, slow: bool = False):
    @fuzz_settings(n)
    @given(req=requests)
    def test(server, req):
        check(server, req)

    return pytest.mark.slow(test) if slow else test


test_chat_completions = _fuzz(CHAT_REQUESTS, 60)
test_completions = _fuzz(COMPLETION_REQUESTS, 40)
test_bodies_that_are_not_objects = _fuzz(raw_requests(), 20)
test_other_routes_and_methods = _fuzz(other_requests(), 30)

test_chat_completions_many = _fuzz(CHAT_REQUESTS, 400, slow=True)
test_completions_many = _fuzz(COMPLETION_REQUESTS, 300, slow=True)
test_bodies_that_are_not_objects_many = _fuzz(raw_requests(), 100, slow=True)
test_other_routes_and_methods_many = _fuzz(other_requests(), 200, slow=True)


HI = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
HI_PROMPT = {"prompt": "The quick", "max_tokens": 2}
KNOWN = {  # hand-picked edges, each reported on its own
    "chat ok": post(CHAT, HI),
    "chat stream ok": post(CHAT, {**HI, "stream": True, "stream_options": {"include_usage": True}}),
    "completion ok": post(COMPLETIONS, HI_PROMPT),
    "completion stream ok": post(COMPLETIONS, {**HI_PROMPT, "stream": True}),
    "chat lone surrogate content": post(CHAT, {**HI, "messages": [{"role": "user", "content": "\ud800"}]}),
    "chat lone surrogate in a text part": post(CHAT, {**HI, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}),
    "chat lone surrogate stream": post(CHAT, {**HI, "stream": True,
                                              "messages": [{"role": "user", "content": "\ud800"}]}),
    "completion lone surrogate prompt": post(COMPLETIONS, {**HI_PROMPT, "prompt": "\ud800"}),
    "completion lone surrogate stop": post(COMPLETIONS, {**HI_PROMPT, "stop": "\ud800"}),
    "chat lone surrogate stop": post(CHAT, {**HI, "stop": ["\udc00"]}),
    "chat lone surrogate model": post(CHAT, {**HI, "model": "\ud800"}),
    "chat surrogate as raw bytes": post(CHAT, {**HI, "messages": [{"role": "user", "content": "\ud800"}]}, "utf-8"),
    "chat role is a list": post(CHAT, {**HI, "messages": [{"role": ["user"], "content": "Hi"}]}),
    "chat role is an object": post(CHAT, {**HI, "messages": [{"role": {}, "content": "Hi"}]}),
    "chat tool role": post(CHAT, {**HI, "messages": [{"role": "tool", "tool_call_id": "c", "content": "x"}]}),
    "chat assistant tool_calls": post(CHAT, {**HI, "messages": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]}),
    "chat null user content": post(CHAT, {**HI, "messages": [{"role": "user", "content": None}]}),
    "chat image part": post(CHAT, {**HI, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}}]}]}),
    "chat temperature 1e400": post(CHAT, {**HI, "temperature": Raw("1e400")}),
    "chat temperature NaN": post(CHAT, {**HI, "temperature": Raw("NaN")}),
    "chat temperature 10**400": post(CHAT, {**HI, "temperature": 10**400}),
    "chat top_p -10**400": post(CHAT, {**HI, "top_p": -(10**400)}),
    "chat temperature subnormal": post(CHAT, {**HI, "temperature": 1e-308}),
    "completion temperature 5e-324 stream": post(COMPLETIONS, {**HI_PROMPT, "temperature": 5e-324, "stream": True}),
    "completion repetition_penalty 5e-324": post(COMPLETIONS, {**HI_PROMPT, "max_tokens": 8,
                                                               "repetition_penalty": 5e-324}),
    "chat max_tokens 5000 digits": post(CHAT, {**HI, "max_tokens": Raw("1" * 5000)}),
    "chat max_tokens 2**63": post(CHAT, {**HI, "max_tokens": 2**63}),
    "chat max_tokens -2**63": post(CHAT, {**HI, "max_tokens": -2**63}),
    "chat max_tokens 0": post(CHAT, {**HI, "max_tokens": 0}),
    "chat max_tokens 1e308": post(CHAT, {**HI, "max_tokens": 1e308}),
    "chat seed 2**64": post(CHAT, {**HI, "seed": 2**64}),
    "chat top_k 2**63": post(CHAT, {**HI, "top_k": 2**63}),
    "chat stop number": post(CHAT, {**HI, "stop": 5}),
    "chat stop list of 17": post(CHAT, {**HI, "stop": ["x"] * 17}),
    "chat deep nesting": Req("POST", CHAT, f'{{"messages": {_nested(100_000)}}}'.encode()),
    "completion deep nesting": Req("POST", COMPLETIONS, _nested(100_000).encode()),
    "body not UTF-8": Req("POST", CHAT, b'{"messages": "\xff"}'),
    "body a JSON list": post(CHAT, [HI]),
    "body NaN": Req("POST", CHAT, b"NaN"),
    "body empty": Req("POST", CHAT, b""),
    "body as a form": post(CHAT, HI, content_type="application/x-www-form-urlencoded"),
    "body without content type": post(CHAT, HI, content_type=None),
    "body over 16 MiB": Req("POST", COMPLETIONS, b'{"prompt": "' + b"a" * (17 * 2**20) + b'"}'),
    "response_format text": post(CHAT, {**HI, "response_format": {"type": "text"}}),
    "response_format json_object": post(CHAT, {**HI, "response_format": {"type": "json_object"}}),
    "response_format json_schema": post(CHAT, {**HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}),
    "response_format json_schema stream": post(CHAT, {**HI, "stream": True, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}),
    "response_format json_schema without schema": post(CHAT, {**HI, "response_format": {"type": "json_schema"}}),
    "response_format schema $ref #": post(CHAT, {**HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"$ref": "#"}}}}),
    "response_format schema unsatisfiable": post(CHAT, {**HI, "response_format": {
        "type": "json_schema",
        "json_schema": {"name": "a", "schema": {"type": "integer", "minimum": 5, "maximum": 3}}}}),
    "response_format schema bad pattern": post(CHAT, {**HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "string", "pattern": "("}}}}),
    "response_format schema lone surrogate": post(CHAT, {**HI, "response_format": {
        "type": "json_schema", "json_schema": {"name": "a", "schema": {"const": "\ud800"}}}}),
    "response_format a string": post(CHAT, {**HI, "response_format": "json_object"}),
    "response_format type list": post(CHAT, {**HI, "response_format": {"type": ["text"]}}),
    "response_format completions json_object": post(COMPLETIONS, {**HI_PROMPT,
                                                                   "response_format": {"type": "json_object"}}),
    "tools one function": post(CHAT, {**HI, "tools": [WEATHER]}),
    "tools one function stream": post(CHAT, {**HI, "tools": [WEATHER], "stream": True}),
    "tools required": post(CHAT, {**HI, "tools": [WEATHER], "tool_choice": "required"}),
    "tools named": post(CHAT, {**HI, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}),
    "tools named missing": post(CHAT, {**HI, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}),
    "tools named stream": post(CHAT, {**HI, "stream": True, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "get_weather"}}}),
    "tools not a list": post(CHAT, {**HI, "tools": {"type": "function"}}),
    "tools list of junk": post(CHAT, {**HI, "tools": [1, None, "x"]}),
    "tools function without name": post(CHAT, {**HI, "tools": [{"type": "function", "function": {}}]}),
    "tools name is a list": post(CHAT, {**HI, "tools": [{"type": "function", "function": {"name": ["f"]}}]}),
    "tools parameters $ref #": post(CHAT, {**HI, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"$ref": "#"}}}]}),
    "llama-server json_schema": post(CHAT, {**HI, "json_schema": SCHEMA}),
    "llama-server grammar": post(CHAT, {**HI, "grammar": 'root ::= "yes" | "no"'}),
    "llama-server grammar left-recursive": post(COMPLETIONS, {**HI_PROMPT, "grammar": "start: start"}),
    "llama-server grammar and response_format": post(CHAT, {**HI, "grammar": 'start: "a"',
                                                             "response_format": {"type": "json_object"}}),
    "tool_choice without tools": post(CHAT, {**HI, "tool_choice": "required"}),
    "tool_choice a list": post(CHAT, {**HI, "tools": [WEATHER], "tool_choice": ["auto"]}),
    "tool_choice function name a dict": post(CHAT, {**HI, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": {}}}}),
    "GET chat": Req("GET", CHAT, headers=()),
    "POST health": post("/health", {}),
    "DELETE models": Req("DELETE", "/v1/models", headers=()),
    "OPTIONS chat": Req("OPTIONS", CHAT, headers=()),
    "FOO chat": Req("FOO", CHAT, headers=()),
    "HEAD health": Req("HEAD", "/health", headers=()),
    "unknown path": Req("GET", "/v1/embeddings", headers=()),
    "model by id": Req("GET", "/v1/models/" + MODEL_ID, headers=()),
    "model unknown id": Req("GET", "/v1/models/gpt-4o", headers=()),
    "model id percent-encoded surrogate": Req("GET", "/v1/models/%ED%A0%80", headers=()),
    "model id empty": Req("GET", "/v1/models/", headers=()),
    "chat trailing slash": post(CHAT + "/", HI),
    "asterisk path": Req("OPTIONS", "*", headers=()),
}


@pytest.mark.parametrize("name", list(KNOWN))
def test_known_edges(server, name):
    check(server, KNOWN[name])
