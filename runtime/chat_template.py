"""Chat templates: the model's Jinja template, rendered the way transformers'
``apply_chat_template(messages, tokenize=False, ...)`` renders it, in a sandbox.

A chat template is code from a model file, so it is untrusted. Three fences:

* jinja2's ImmutableSandboxedEnvironment (no ``__class__``/``__globals__``, no
  mutating list/dict methods); touching an unsafe attribute is refused at once.
* Size limits on everything a template can build: output, strings and lists made
  by ``+ * %``, call and filter arguments and results, ``range()``, namespaces.
  These stop single C-level operations (``'x' * 10**12``) before they allocate.
* A wall-clock deadline on render, checked by a trace function on every Python
  call and every line of template code, so loops of any shape end
  (``for a in s, for b in s``).

The environment copies transformers' (utils/chat_template_utils.py): trim_blocks,
lstrip_blocks, loopcontrols, a ``{% generation %}`` tag, ``tojson`` without HTML
escaping, ``raise_exception``, ``strftime_now``, and the restricted ``dict`` and
``namespace``. Render variables are the same too: messages, tools, documents,
add_generation_prompt, bos_token/eos_token, then the caller's extra variables.
"""

from __future__ import annotations

import json
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from typing import Any, Callable, Iterator

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.exceptions import SecurityError, TemplateError, TemplateSyntaxError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import BadArgumentError, BadModelFileError, EdgeLlamaError

_FIX = "use a trusted chat_template.jinja in the model folder, or prompt without the template"

MAX_OUTPUT = 4_000_000  # chars a render may produce; also the largest str/list/int a template may build
MAX_INPUT = MAX_OUTPUT // 2  # chars of message content a render accepts
MAX_RANGE = 100_000  # items in one range()
MAX_INT_BITS = 4096  # largest result of ** (10**12 is 40 bits)
MAX_SECONDS = 2.0  # wall clock for one render
_HUGE_WIDTH = re.compile(r"\d{7}")  # a format width/precision >= 1e6 in '%s' or '{}' strings


class ChatTemplate:
    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None):
        if not isinstance(source, str):
            raise BadModelFileError(f"chat template must be a string, got {type(source).__name__}")
        tokens = {"bos_token": bos_token, "eos_token": eos_token}
        self.special_tokens = {k: v for k, v in tokens.items() if v is not None}
        with _template_errors():  # compiling runs no template code: see _guard_filter
            self.template = _environment().from_string(source)

    def render(self, messages: list[dict], add_generation_prompt: bool = True, **extra: Any) -> str:
        """The prompt text for messages ([{"role": str, "content": str, ...}]).
        extra: more template variables (tools, documents, enable_thinking, ...)."""
        chat = _checked_messages(messages)
        variables = _plain({**self.special_tokens, **extra}, "extra")
        tools, documents = variables.pop("tools", None), variables.pop("documents", None)
        with _template_errors(), _deadline(MAX_SECONDS):
            chunks = self.template.generate(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
            return _bounded_join(chunks)


# --- errors -------------------------------------------------------------------------------


class _LimitExceeded(BaseException):
    """A size or time limit hit. BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way (jinja internals, filters) lets the render go on."""


class _Raised(TemplateError):
    """raise_exception("...") from the template: it rejects the messages."""


@contextmanager
def _template_errors() -> Iterator[None]:
    try:
        yield
    except EdgeLlamaError:
        raise
    except _Raised as e:
        raise BadArgumentError(f"the chat template rejected the messages: {e.message}") from None
    except TemplateSyntaxError as e:
        raise BadModelFileError(f"chat template has a syntax error on line {e.lineno}: {e.message}; {_FIX}") from None
    except SecurityError as e:
        raise BadModelFileError(
            f"chat template tried an unsafe operation: {e}; the model's template is refused — {_FIX}"
        ) from None
    except _LimitExceeded as e:
        raise BadModelFileError(f"chat template exceeded a limit: {e}; the model's template is refused — {_FIX}") from None
    except Exception as e:  # anything else the template's code raised
        raise BadModelFileError(f"chat template failed to render: {type(e).__name__}: {e}; {_FIX}") from None


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    """Raise _LimitExceeded once `seconds` pass: checked on every Python call, and
    on every line of the template's own code (its loops need not call anything).
    The trace function is this thread's only one meanwhile; the old one comes back."""
    end = time.monotonic() + seconds

    def check() -> None:
        if time.monotonic() > end:
            raise _LimitExceeded(f"ran longer than {seconds:g} s")

    def on_line(frame: Any, event: str, arg: Any) -> Callable:
        check()
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Callable | None:
        check()
        return on_line if frame.f_code.co_filename == "<template>" else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


def _bounded_join(chunks: Iterator[str]) -> str:
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_OUTPUT:
            raise _LimitExceeded(f"output longer than {MAX_OUTPUT} characters")
        out.append(chunk)
    return "".join(out)


# --- size checks ----------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _check_format(fmt: Any) -> None:
    if isinstance(fmt, str) and _HUGE_WIDTH.search(fmt):
        raise _LimitExceeded("a format string asks for a width of a million or more")


def _check_size(n: int, what: str) -> None:
    if n > MAX_OUTPUT:
        raise _LimitExceeded(f"{what} of size {n} is over the limit of {MAX_OUTPUT}")


def _check_result(x: Any) -> Any:
    """x, if it is not too big to keep building on."""
    if isinstance(x, (str, list, tuple, dict)):
        _check_size(len(x), f"a {type(x).__name__}")
    return x


def _check_call(name: str, value: Any, args: tuple, kwargs: dict) -> None:
    """Arguments of a call or filter; value is the string a str method or filter works on."""
    for a in (*args, *kwargs.values()):
        if _is_int(a):  # widths, counts: center(10**9), indent(...)
            _check_size(abs(a), "an integer argument")
        _check_result(a)  # e.g. a macro that calls itself with s ~ s
    if name == "format":
        _check_format(value)
    if name == "replace" and isinstance(value, str) and len(args) >= 2:
        _check_replace(value, *args[:3])


def _check_replace(s: str, old: Any, new: Any, count: Any = None) -> None:
    # str.replace allocates its whole result at once: predict its length.
    if not (isinstance(old, str) and isinstance(new, str)):
        return
    n = len(s) + 1 if old == "" else s.count(old)
    if _is_int(count) and count >= 0:
        n = min(n, count)
    _check_size(len(s) + n * (len(new) - len(old)), "a replace() result")


def _check_binop(op: str, left: Any, right: Any) -> None:
    seq = (str, list, tuple)
    if op == "*" and _is_int(right) and isinstance(left, seq):
        _check_size(len(left) * right, "a repeated sequence")
    elif op == "*" and _is_int(left) and isinstance(right, seq):
        _check_size(len(right) * left, "a repeated sequence")
    elif op == "+" and isinstance(left, seq) and isinstance(right, seq):
        _check_size(len(left) + len(right), "a concatenation")
    elif op == "**" and _is_int(left) and _is_int(right) and abs(left) > 1 and right > 0:
        if abs(left).bit_length() * right > MAX_INT_BITS:
            raise _LimitExceeded(f"{left} ** {right} is too large")
    elif op == "%":
        _check_format(left)


# --- the environment --------------------------------------------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})  # also stops compile-time folding

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # jinja returns an Undefined that fails only when used; refuse on touch.
        raise SecurityError(f"access to attribute {attribute!r} of a {type(obj).__name__!r} object")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        _check_binop(operator, left, right)
        return _check_result(super().call_binop(context, operator, left, right))

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        # (jinja's own double-underscore names, so template kwargs cannot clash)
        value = getattr(__obj, "__self__", None)
        _check_call(getattr(__obj, "__name__", ""), value, args, kwargs)
        return _check_result(super().call(__context, __obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:
            _check_format(value.__self__)
        return wrapped


def _guard_filter(name: str, f: Callable) -> Callable:
    """f with its arguments and result size-checked. The wrapper is pass_context,
    which also keeps jinja from running it at compile time to fold constants
    (compiling then runs no filter code, so it needs no deadline)."""
    kind = getattr(getattr(f, "jinja_pass_arg", None), "name", None)  # what f wants first

    @jinja2.pass_context
    def guarded(context: Any, value: Any = None, *args: Any, **kwargs: Any) -> Any:
        _check_call(name, value, args, kwargs)
        first = {"context": context, "eval_context": context.eval_ctx, "environment": context.environment}
        head = (first[kind],) if kind in first else ()
        return _check_result(f(*head, value, *args, **kwargs))

    return guarded


class _Generation(jinja2.ext.Extension):
    """{% generation %}...{% endgeneration %}: transformers marks assistant text
    with it (for training masks); here it just renders its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Callable[[], str]) -> str:
        return caller()


class _TemplateDict:
    """dict(...) and dict.fromkeys(...) without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """namespace(...) that refuses "_" names (CPython internals) and huge values."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 (jinja's signature trick)
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name, value in attrs.items():
            _Namespace._check(name, value)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name, value)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any, value: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise SecurityError(f"namespace attribute {name!r} starts with an underscore")
        _check_result(value)


def _range(*args: Any) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise _LimitExceeded(f"range() of {len(r)} items (the limit is {MAX_RANGE})")
    return r


def _raise_exception(message: Any) -> None:
    raise _Raised(str(message))


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False) -> str:
    # transformers' tojson: no HTML escaping, unicode kept, json.dumps options exposed
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters = {name: _guard_filter(name, f) for name, f in env.filters.items()}
    env.globals.update(
        range=_range,
        raise_exception=_raise_exception,
        strftime_now=_strftime_now,
        dict=_TemplateDict(),
        namespace=_Namespace,
    )
    return env


# --- messages ------------------------------------------------------------------------------------

_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # as transformers aliases them


def _checked_messages(messages: Any) -> list[dict]:
    """A plain copy of messages, as transformers passes them: None values dropped,
    reasoning aliased under "thinking" and "reasoning_content"."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise BadArgumentError(f"chat: messages must be a non-empty list of dicts, got {messages!r:.80}")
    chat = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise BadArgumentError(f"chat: message {i} must be a dict, got {type(m).__name__}")
        for key in ("role", "content"):
            if not isinstance(m.get(key), str):
                raise BadArgumentError(f"chat: message {i} needs a string {key!r}, got {m.get(key)!r:.80}")
        chat.append(_alias_reasoning(_plain({k: v for k, v in m.items() if v is not None}, f"message {i}")))
    size = sum(len(m["content"]) for m in chat)
    if size > MAX_INPUT:
        raise BadArgumentError(f"chat: the messages hold {size} characters, over the limit of {MAX_INPUT}")
    return chat


def _alias_reasoning(m: dict) -> dict:
    reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
    if reasoning is None:
        return m
    return {"thinking": reasoning, **m, "reasoning_content": reasoning}


def _plain(x: Any, where: str) -> Any:
    """A copy made of JSON types only (subclasses cut back to the base type), so the
    template sees no methods beyond those of str/int/float/list/dict."""
    if x is None or type(x) in (bool, str, int, float):
        return x
    if isinstance(x, str):  # str/int/float subclasses: enums, numpy scalars, ...
        return str.__str__(x)
    if isinstance(x, int):
        return int.__int__(x)
    if isinstance(x, float):
        return float.__float__(x)
    if isinstance(x, dict):
        return {_plain(k, where): _plain(v, f"{where}.{k}") for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v, f"{where}[{i}]") for i, v in enumerate(x)]
    if isinstance(x, tuple):
        return tuple(_plain(v, f"{where}[{i}]") for i, v in enumerate(x))
    raise BadArgumentError(f"chat: {where} holds a {type(x).__name__}; only JSON values can go to the template")
