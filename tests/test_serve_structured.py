"""`edgellama serve`: response_format (JSON objects, JSON schemas), llama-server's json_schema /
grammar fields, and OpenAI function tools, on tiny random models behind a real server driven by
the real `openai` client. A random model writes nonsense, so whatever parses and validates does
so because the grammar held it to the schema."""

from __future__ import annotations

import http.client
import json
import os
import shutil

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

from edgellama.runtime.model import Model  # noqa: E402
from edgellama.serve import tools as toolkit  # noqa: E402
from edgellama.serve.protocol import plan_chat  # noqa: E402
from edgellama.serve.server import Server, bind  # noqa: E402

os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")

CITY = {"type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                          "days": {"type": "integer", "minimum": 1, "maximum": 9}},
        "required": ["city", "days"], "additionalProperties": False}
ZONE = {"type": "object", "properties": {"tz": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["tz"],
        "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": CITY}},
         {"type": "function", "function": {"name": "get_time", "parameters": ZONE}}]
SCHEMAS = {"get_weather": CITY, "get_time": ZONE}
FOX = [{"role": "user", "content": "The quick brown fox"}]
DOG = [{"role": "user", "content": "jumps over"}]  # greedy json_object ends quickly on this one


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from conftest import make_tiny
    from edgellama.exporter.export import export

    base = tmp_path_factory.mktemp("tiny-structured")
    make_tiny(base / "hf", max_position_embeddings=4096)  # room for a tools section in the prompt
    export(base / "hf", base / "onnx")
    return base / "onnx"


def _serve(model: Model):
    srv = Server(model, bind("127.0.0.1", 0), max_concurrent=2, log_level="warning").start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    return srv, client


@pytest.fixture(scope="module")
def generic(tiny_folder):
    """The tiny model with conftest's template, which ignores tools: the generic format."""
    model = Model.load(tiny_folder, threads=1)
    srv, client = _serve(model)
    yield model, srv, client
    srv.stop()


def raw(srv, path: str, body: bytes) -> tuple[int, dict]:
    host, port = srv.sock.getsockname()[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    try:
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def _stream_message(chunks) -> tuple[str | None, list[dict], str]:
    """(content, tool calls, finish_reason) put together from streamed chunks as a client does."""
    content, calls, finish = [], {}, None
    for chunk in chunks:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        delta = choice.delta
        if delta.content:
            content.append(delta.content)
        for tc in delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            if tc.id:
                assert call["id"] is None and tc.type == "function"
                assert tc.function.arguments == ""  # OpenAI's first delta: the name, arguments ""
                call["id"], call["name"] = tc.id, tc.function.name
            elif tc.function.arguments:
                assert call["id"] is not None  # fragments come after the call's first delta
                call["arguments"] += tc.function.arguments
        finish = choice.finish_reason or finish
    return "".join(content) or None, [calls[i] for i in sorted(calls)], finish


def _calls(message) -> list[dict]:
    return [{"id": c.id, "name": c.function.name, "arguments": c.function.arguments} for c in message.tool_calls or []]


def _check_calls(calls: list[dict], names=SCHEMAS, cut: bool = False) -> None:
    """Each call has an id and arguments valid against its function's schema (cut: but the last,
    which the token limit stopped)."""
    assert calls
    for call in calls[:-1] if cut else calls:
        assert call["id"].startswith("call_") and len(call["id"]) > 10
        jsonschema.validate(json.loads(call["arguments"]), names[call["name"]])


# --- response_format ------------------------------------------------------------------------------


def test_json_object_streamed_and_not(generic):
    _, srv, client = generic
    kw = dict(model=srv.model_id, messages=DOG, temperature=0, max_tokens=64, response_format={"type": "json_object"})
    r = client.chat.completions.create(**kw)
    text = r.choices[0].message.content
    assert r.choices[0].finish_reason == "stop" and isinstance(json.loads(text), dict)
    content, calls, finish = _stream_message(client.chat.completions.create(**kw, stream=True))
    assert (content, calls, finish) == (text, [], "stop")


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(generic, stream):
    _, srv, client = generic
    fmt = {"type": "json_schema", "json_schema": {"name": "weather", "schema": CITY, "strict": True}}
    for seed in range(3):
        kw = dict(model=srv.model_id, messages=FOX, temperature=1, seed=seed, max_tokens=200, response_format=fmt)
        if stream:
            text, _, finish = _stream_message(client.chat.completions.create(**kw, stream=True))
        else:
            r = client.chat.completions.create(**kw)
            text, finish = r.choices[0].message.content, r.choices[0].finish_reason
        assert finish == "stop"
        jsonschema.validate(json.loads(text), CITY)


def test_completions_take_response_format_and_json_schema(generic):
    _, srv, client = generic
    r = client.completions.create(model=srv.model_id, prompt="The quick", temperature=0.7, seed=1, max_tokens=200,
                                  extra_body={"response_format": {"type": "json_schema",
                                                                  "json_schema": {"name": "z", "schema": ZONE}}})
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].text), ZONE)
    r = client.completions.create(model=srv.model_id, prompt="The quick", temperature=0.7, seed=1, max_tokens=200,
                                  extra_body={"json_schema": ZONE})  # llama-server's field
    jsonschema.validate(json.loads(r.choices[0].text), ZONE)
    r = client.completions.create(model=srv.model_id, prompt="The quick", temperature=0.7, seed=1, max_tokens=20,
                                  extra_body={"grammar": 'root ::= "yes" | "no"'})  # GBNF, as llama-server takes
    assert r.choices[0].text in ("yes", "no") and r.choices[0].finish_reason == "stop"


BAD_FORMATS = [  # (fields over a chat request, param, words in the message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}}},
     "response_format.json_schema.schema", "Invalid type: strnig"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "strnig"}}}}}},
     "response_format.json_schema.schema", "at /properties/a"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "string", "format": "foo"}}}}}},
     "response_format.json_schema.schema", "Unknown format: foo"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}}},
     "response_format.json_schema.schema", "JSON schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": CITY}}},
     "response_format.json_schema.name", "name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", "json_schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": CITY, "strict": "yes"}}},
     "response_format.json_schema.strict", "strict"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_schema"),
    ({"response_format": "json"}, "response_format", "object"),
    ({"response_format": {"type": "json_object"}, "json_schema": CITY}, "json_schema", "give one"),
    ({"grammar": "start: foo bar baz("}, "grammar", "grammar"),
    ({"tools": [{**TOOLS[0], "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strnig"}}}}}]},
     "tools[0].function.parameters", "at /properties/a"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name", "letters"),
    ({"tools": [{"type": "custom", "custom": {"name": "f"}}]}, "tools[0].type", "function tools"),
    ({"tools": [TOOLS[0], TOOLS[0]]}, "tools[1].function.name", "twice"),
    ({"tools": "get_weather"}, "tools", "list"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "not in tools"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "required"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls", "true or false"),
    ({"tools": TOOLS, "grammar": 'root ::= "a"'}, "grammar", "cannot go with tools"),
    ({"messages": [*FOX, {"role": "tool", "content": "42"}]}, "messages[1].tool_call_id", "tool_call_id"),
    ({"messages": [*FOX, {"role": "tool", "tool_call_id": "call_1", "content": "42"}]},
     "messages[1].tool_call_id", "answers no tool call"),
    ({"messages": [*FOX, {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function",
                                                                "function": {"name": "f", "arguments": 5}}]}]},
     "messages[1].tool_calls[0].function.arguments", "JSON string"),
    ({"messages": [*FOX, {"role": "assistant", "tool_calls": {"id": "c1"}}]}, "messages[1].tool_calls", "list"),
]


@pytest.mark.parametrize("fields,param,words", BAD_FORMATS)
def test_bad_formats_and_tools_answer_400_naming_the_field(generic, fields, param, words):
    _, srv, client = generic
    fields = dict(fields)
    extra = {k: fields.pop(k) for k in ("json_schema", "grammar") if k in fields}  # llama-server's fields
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**{"model": srv.model_id, "messages": FOX, "max_tokens": 4, **fields},
                                       extra_body=extra)
    body = info.value.body
    assert body["param"] == param and words in body["message"], body
    assert body["type"] == "invalid_request_error" and "\n" not in body["message"]


def test_completions_still_refuse_tools(generic):
    _, srv, client = generic
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=srv.model_id, prompt="hi", max_tokens=2, extra_body={"tools": TOOLS})
    assert info.value.body["param"] == "tools" and info.value.body["code"] == "unsupported_parameter"


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["ok \udfff"]}, "prompt[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udc00"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": FOX, "stop": ["\ud83d"]}, "stop[0]"),
    ("/v1/chat/completions", {"messages": FOX, "tools": [{"type": "function", "function": {
        "name": "f", "description": "\ud800"}}]}, "tools[0].function.description"),
    ("/v1/chat/completions", {"messages": FOX, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"\ud800": {}}}}}},
     "response_format.json_schema.schema.properties"),
])
def test_lone_surrogates_answer_400_naming_the_field(generic, path, body, param):
    _, srv, _ = generic
    status, answer = raw(srv, path, json.dumps({**body, "max_tokens": 2}).encode())  # json escapes them as \ud800
    assert status == 400, answer
    assert answer["error"]["param"] == param and "surrogate" in answer["error"]["message"]


def test_a_deeply_nested_body_answers_400(generic):
    _, srv, _ = generic
    status, answer = raw(srv, "/v1/completions", b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and "nests too deeply" in answer["error"]["message"]


# --- tools, generic format (a template without tools) ------------------------------------------------


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
@pytest.mark.parametrize("parallel", [False, True])
def test_required_and_named_choices_always_call(generic, choice, parallel):
    _, srv, client = generic
    names = SCHEMAS if choice == "required" else {"get_time": ZONE}
    for seed in range(2):
        kw = dict(model=srv.model_id, messages=FOX, tools=TOOLS, tool_choice=choice, parallel_tool_calls=parallel,
                  temperature=1, seed=seed, max_tokens=300)
        r = client.chat.completions.create(**kw)
        message, finish = r.choices[0].message, r.choices[0].finish_reason
        calls = _calls(message)
        assert message.content is None and len({c["id"] for c in calls}) == len(calls)
        if parallel and finish == "length":  # a random model may go on calling: the last call is cut
            _check_calls(calls, names, cut=True)
        else:
            assert finish == "tool_calls" and (parallel or len(calls) == 1)
            _check_calls(calls, names)
        content, streamed, streamed_finish = _stream_message(client.chat.completions.create(**kw, stream=True))
        assert (content, streamed_finish) == (None, finish)
        assert [(c["name"], c["arguments"]) for c in streamed] == [(c["name"], c["arguments"]) for c in calls]


def test_auto_answers_text_or_valid_calls_and_none_renders_no_tools(generic):
    model, srv, client = generic
    for seed in range(3):
        kw = dict(model=srv.model_id, messages=FOX, tools=TOOLS, temperature=1, seed=seed, max_tokens=40)
        r = client.chat.completions.create(**kw)  # tool_choice left out: auto
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                _check_calls(_calls(choice.message))
        else:
            assert "<tool_call>" not in choice.message.content  # the grammar: text never holds the marker
        content, calls, finish = _stream_message(client.chat.completions.create(**kw, stream=True))
        assert finish == choice.finish_reason and content == choice.message.content
        assert [c["arguments"] for c in calls] == [c["arguments"] for c in _calls(choice.message)]
    none = client.chat.completions.create(model=srv.model_id, messages=FOX, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=8)
    assert none.choices[0].message.tool_calls is None
    assert none.usage.prompt_tokens == len(model.render_chat(FOX))  # no tools section


def test_auto_grammar_takes_text_or_whole_calls_only(generic):
    from edgellama.runtime.constrain import Constraint, Grammar

    model = generic[0]
    fmt = toolkit.FORMATS["generic"]
    text, _ = toolkit.grammar(model, fmt, toolkit.parse_tools(TOOLS), "auto", True)
    grammar = Grammar.lark(text)
    call = '<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>'

    def takes(answer: str) -> bool:
        ids = model.encode(answer, add_special_tokens=False)
        return Constraint(model, grammar).valid_prefix(ids) == len(ids)

    assert takes("plain text, no call") and takes(call) and takes("Let me look.\n" + call + "\n" + call)
    assert not takes("text <tool_call> then nonsense")
    assert not takes('<tool_call>\n{"name": "get_time", "arguments": {"tz": "PST"}}')  # off the schema
    assert not takes('<tool_call>\n{"name": "rm_rf", "arguments": {}}')  # not a tool


def test_tool_results_go_back_through_the_template(generic):
    model, srv, client = generic
    first = client.chat.completions.create(model=srv.model_id, messages=FOX, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=300)
    call = first.choices[0].message.tool_calls[0]
    history = [*FOX, first.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"}]
    body = {"messages": history, "tools": TOOLS}
    r = client.chat.completions.create(model=srv.model_id, temperature=0, max_tokens=8, **body)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = model.tokenizer.decode(plan_chat(body, model, srv.model_id).prompt_ids, skip_special_tokens=False)
    arguments = json.dumps(json.loads(call.function.arguments), ensure_ascii=False)
    assert f'<assistant><tool_call>\n{{"name": "{call.function.name}", "arguments": {arguments}}}\n</tool_call></s>' \
        in prompt
    assert "<user><tool_response>\nsunny, 21 C\n</tool_response></s><assistant>" in prompt
    assert prompt.startswith("<system># Tools") and '"name": "get_weather"' in prompt
    without_tools = plan_chat({"messages": history}, model, srv.model_id)  # history alone renders the same way
    assert without_tools.tools is None
    assert "<tool_response>" in model.tokenizer.decode(without_tools.prompt_ids, skip_special_tokens=False)


def test_call_parser_streams_as_whole():
    fmt = toolkit.FORMATS["hermes"]
    text = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a}\\"b"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n</tool_call>')
    whole = toolkit.CallParser(fmt)
    events = whole.feed(text) + whole.finish()
    parts = toolkit.CallParser(fmt)
    events_by_char = [e for c in text for e in parts.feed(c)] + parts.finish()
    assert [(c["name"], c["arguments"]) for c in whole.calls] == [(c["name"], c["arguments"]) for c in parts.calls] \
        == [("get_weather", '{"city": "Paris", "note": "a}\\"b"}'), ("get_time", '{"tz": "UTC"}')]
    assert "".join(e[1] for e in events if e[0] == "content") == "Let me check."
    assert "".join(e[1] for e in events_by_char if e[0] == "content") == "Let me check."
    held = toolkit.CallParser(fmt)
    assert held.feed("a <tool_") == [("content", "a")]  # what may be the marker waits
    assert held.finish() == [("content", " <tool_")]
    cut = toolkit.CallParser(fmt)  # the token limit inside the arguments
    cut.feed('<tool_call>\n{"name": "f", "arguments": {"a": [1, 2')
    cut.finish()
    assert cut.calls[0]["arguments"] == '{"a": [1, 2'


# --- tools, native formats: templates that render tools themselves --------------------------------

HERMES = """{%- if tools %}<system>You may call functions. <tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools>
Call one as <tool_call>
{"name": <name>, "arguments": <args>}
</tool_call></s>{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}<assistant>{{ m.content }}
{%- for c in m.tool_calls %}<tool_call>
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}
</tool_call>{% endfor %}</s>
{%- elif m.role == 'tool' %}<tool><tool_response>{{ m.content }}</tool_response></s>
{%- else %}<{{ m.role }}>{{ m.content }}</s>{% endif %}
{%- endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"""

LLAMA3 = """{%- if tools %}<system>Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.
{% for t in tools %}{{ t | tojson }}{% endfor %}</s>{% endif %}
{%- for m in messages %}
{%- if m.role == 'assistant' and m.tool_calls %}{% if m.tool_calls | length != 1 %}{{ raise_exception("only single tool-calls") }}{% endif %}
{%- set c = m.tool_calls[0].function %}<assistant>{"name": "{{ c.name }}", "parameters": {{ c.arguments | tojson }}}</s>
{%- elif m.role == 'tool' %}<ipython>{{ m.content }}</s>
{%- else %}<{{ m.role }}>{{ m.content }}</s>{% endif %}
{%- endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"""

MISTRAL = """{%- set ns = namespace(last=-1) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.last = loop.index0 %}{% endif %}{% endfor %}
{%- for m in messages %}
{%- if m.role == 'user' %}{% if loop.index0 == ns.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]
{%- elif m.role == 'assistant' and m.tool_calls %}[TOOL_CALLS][{% for c in m.tool_calls %}
{%- if c.id | length != 9 %}{{ raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}{% endif %}
{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}, "id": "{{ c.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]</s>
{%- elif m.role == 'tool' %}[TOOL_RESULTS]{"call_id": "{{ m.tool_call_id }}", "content": {{ m.content | tojson }}}[/TOOL_RESULTS]
{%- else %}{{ m.content }}</s>{% endif %}
{%- endfor %}"""

NATIVE = {"hermes": HERMES, "llama3": LLAMA3, "mistral": MISTRAL}


@pytest.fixture(scope="module", params=sorted(NATIVE))
def native(request, tiny_folder, tmp_path_factory):
    """The tiny model with a template that renders tools; Mistral's marker is a special token."""
    name = request.param
    folder = tmp_path_factory.mktemp(f"tiny-{name}") / "onnx"
    shutil.copytree(tiny_folder, folder)
    (folder / "chat_template.jinja").write_text(NATIVE[name])
    if name == "mistral":
        tok = json.loads((folder / "tokenizer.json").read_text())
        new_id = max(*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])) + 1
        tok["added_tokens"].append({"id": new_id, "content": "[TOOL_CALLS]", "single_word": False, "lstrip": False,
                                    "rstrip": False, "normalized": False, "special": True})
        (folder / "tokenizer.json").write_text(json.dumps(tok))
    model = Model.load(folder, threads=1)
    srv, client = _serve(model)
    yield name, model, srv, client
    srv.stop()


def test_native_templates_are_recognized(native, generic):
    name, model, _, _ = native
    assert toolkit.detect_format(model.chat_template) == name
    assert toolkit.detect_format(generic[0].chat_template) == "generic"


@pytest.mark.parametrize("stream", [False, True])
def test_native_formats_call_and_take_results_back(native, stream):
    name, model, srv, client = native
    kw = dict(model=srv.model_id, messages=FOX, tools=TOOLS, tool_choice="required", temperature=0.8, seed=3,
              max_tokens=300)
    if stream:
        content, calls, finish = _stream_message(client.chat.completions.create(**kw, stream=True))
    else:
        r = client.chat.completions.create(**kw)
        content, calls, finish = r.choices[0].message.content, _calls(r.choices[0].message), r.choices[0].finish_reason
    assert (content, finish) == (None, "tool_calls")
    _check_calls(calls)
    assert name != "llama3" or len(calls) == 1  # its template renders one call a turn

    assistant = {"role": "assistant", "content": None, "tool_calls": [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for c in calls]}
    results = [{"role": "tool", "tool_call_id": c["id"], "content": f"result {i}"} for i, c in enumerate(calls)]
    body = {"messages": [*FOX, assistant, *results], "tools": TOOLS}
    r = client.chat.completions.create(model=srv.model_id, temperature=0, max_tokens=4, **body)
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = model.tokenizer.decode(plan_chat(body, model, srv.model_id).prompt_ids, skip_special_tokens=False)
    first = calls[0]
    arguments = json.dumps(json.loads(first["arguments"]))  # a dict to the template, which writes it with tojson
    expected = {"hermes": f'<tool_call>\n{{"name": "{first["name"]}", "arguments": {arguments}}}\n</tool_call>',
                "llama3": f'<assistant>{{"name": "{first["name"]}", "parameters": {arguments}}}</s>',
                "mistral": f'[TOOL_CALLS][{{"name": "{first["name"]}", "arguments": {arguments}, "id": "'}[name]
    assert expected in prompt and "result 0" in prompt and '"get_time"' in prompt


def test_native_auto_and_none(native):
    name, model, srv, client = native
    r = client.chat.completions.create(model=srv.model_id, messages=FOX, tools=TOOLS, temperature=1, seed=0,
                                       max_tokens=30)
    message = r.choices[0].message
    if message.tool_calls and r.choices[0].finish_reason == "tool_calls":
        _check_calls(_calls(message))
    none = client.chat.completions.create(model=srv.model_id, messages=FOX, tools=TOOLS, tool_choice="none",
                                          temperature=0, max_tokens=4)
    assert none.usage.prompt_tokens == len(model.render_chat(FOX)) and none.choices[0].message.tool_calls is None


def test_a_template_that_refuses_the_history_is_a_400_on_messages(native):
    name, model, srv, client = native
    calls = [{"id": f"call_{i}", "type": "function", "function": {"name": "get_time", "arguments": '{"tz": "UTC"}'}}
             for i in range(2)]
    body = {"messages": [*FOX, {"role": "assistant", "tool_calls": calls}], "tools": TOOLS}
    if name != "llama3":  # the others render two calls in a turn
        plan_chat(body, model, srv.model_id)
        return
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=srv.model_id, max_tokens=4, **body)
    assert info.value.body["param"] == "messages" and "only single tool-calls" in info.value.body["message"]


@pytest.mark.parametrize("stream", [False, True])
def test_a_response_format_and_tools_together(native, generic, stream):
    """auto with a response schema: the answer follows the schema, or is a call."""
    for model, srv, client in (native[1:], generic):
        fmt = {"type": "json_schema", "json_schema": {"name": "zone", "schema": ZONE}}
        for seed in range(2):
            kw = dict(model=srv.model_id, messages=FOX, tools=TOOLS[:1], response_format=fmt, temperature=1,
                      parallel_tool_calls=False,
                      seed=seed, max_tokens=300, logprobs=True, top_logprobs=2)
            if stream:
                content, calls, finish = _stream_message(client.chat.completions.create(**kw, stream=True))
            else:
                r = client.chat.completions.create(**kw)
                message = r.choices[0].message
                content, calls, finish = message.content, _calls(message), r.choices[0].finish_reason
                assert len(r.choices[0].logprobs.content) == r.usage.completion_tokens
            if calls:
                assert finish == "tool_calls" and content is None
                _check_calls(calls)
            else:
                assert finish == "stop"
                jsonschema.validate(json.loads(content), ZONE)


def test_call_parser_llama3_and_mistral():
    llama = toolkit.CallParser(toolkit.FORMATS["llama3"])
    events = [e for c in '{"name": "get_time", "parameters": {"tz": "UTC"}}' for e in llama.feed(c)] + llama.finish()
    assert [e[0] for e in events] == ["call"] + ["arguments"] * (len(events) - 1)
    assert llama.calls[0]["arguments"] == '{"tz": "UTC"}'
    answer = toolkit.CallParser(toolkit.FORMATS["llama3"])  # a JSON answer that is not a call: content, early
    assert answer.feed('{"tz": ') == [("content", '{"tz": ')] and answer.finish() == []
    text = toolkit.CallParser(toolkit.FORMATS["llama3"])
    assert text.feed("  Hello {x}") + text.finish() == [("content", "  Hello {x}")]
    mistral = toolkit.CallParser(toolkit.FORMATS["mistral"])
    mistral.feed('[TOOL_CALLS][{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]')
    mistral.finish()
    assert [(c["name"], c["arguments"]) for c in mistral.calls] == [("a", '{"x": 1}'), ("b", "{}")]


# --- the real SmolLM2 (generic format: its template has no tools) -----------------------------------


@pytest.mark.slow
def test_smollm2_calls_a_tool_and_reads_its_result(smollm2_onnx):
    model = Model.load(smollm2_onnx, threads=2)
    srv, client = _serve(model)
    try:
        question = [{"role": "user", "content": "What's the weather in Paris for 3 days?"}]
        r = client.chat.completions.create(model=srv.model_id, messages=question, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=0, max_tokens=60)
        call = r.choices[0].message.tool_calls[0]
        assert r.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
        follow = [*question, r.choices[0].message.model_dump(exclude_none=True),
                  {"role": "tool", "tool_call_id": call.id, "content": "Sunny, 24 C"}]
        r = client.chat.completions.create(model=srv.model_id, messages=follow, tools=TOOLS, tool_choice="none",
                                           temperature=0, max_tokens=30)
        assert r.choices[0].message.content and r.choices[0].message.tool_calls is None
    finally:
        srv.stop()
