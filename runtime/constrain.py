"""Constrained decoding: JSON schemas, any JSON, regular expressions and grammars, on
llguidance (the engine llama.cpp and onnxruntime-genai use; Rust, no dependencies).

    g = Grammar.json_schema({"type": "object", "properties": {...}, "required": [...]})
    g.check(model)                                     # a bad schema: one line naming its path
    model.generate(prompt, constraint=g)               # or json_schema=..., regex=..., grammar=..., json=True

A `Grammar` is a description (immutable, shareable); each generation compiles it into its
own `Constraint`, which masks the logits before sampling (the masked tokens get -inf, so
every sampling option works on what is left) and follows the tokens drawn. The mask for
the next token is computed on a worker thread while onnxruntime runs the forward that
produces the logits it will mask: llguidance and onnxruntime both release the GIL.
Speculative drafts are cut to the prefix the grammar allows before they are verified, and
the matcher only ever consumes tokens that were accepted, so a rejected draft needs no
rollback.

Why llguidance rather than xgrammar: xgrammar needs torch (and transformers) at run time,
which the runtime never imports; llguidance is one 7.6 MB wheel with no dependencies, and
its mask for a JSON schema on SmolLM2's 49,152-token vocabulary takes well under a
millisecond per token (benchmarks/structured.py measures both).
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from .errors import BadArgumentError, MissingExtraError
from .workers import Pending, Workers, shared

if TYPE_CHECKING:
    from .model import Model

WHITESPACE_RUN = 20
WHITESPACE = r"[\x20\x0A\x0D\x09]{0,%d}" % WHITESPACE_RUN

# Mask work for every generation in the process (runtime.workers: daemon threads, so a Ctrl-C
# mid-generation never leaves exit waiting); llguidance releases the GIL while it runs.
MASK_THREADS = 4
_TOKENIZERS_LOCK = threading.Lock()


def _masks() -> Workers:
    return shared("edgellama-mask", MASK_THREADS)


def _llguidance():
    try:
        import llguidance
    except ImportError:  # pragma: no cover - a base dependency, but installs can be trimmed
        raise MissingExtraError("constrained decoding needs llguidance, which this install lacks: "
                                "pip install 'llguidance>=1.0'") from None
    return llguidance


@dataclass(frozen=True)
class Grammar:
    """What the output must match. `source` is llguidance's grammar text (JSON)."""

    kind: str
    source: str
    description: str  # for messages: "the JSON schema", "the regex ...", ...
    schema: Any = None  # the JSON schema, for json_schema (paths in error messages)

    @classmethod
    def json_schema(cls, schema: dict | bool | str) -> "Grammar":
        """Output one JSON value valid against `schema` (a dict, or its JSON text)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except ValueError as exc:
                raise BadArgumentError(f"the JSON schema is not JSON ({exc}); give a JSON object") from None
        if not isinstance(schema, (dict, bool)):
            raise BadArgumentError(f"a JSON schema is an object (or true/false), not {type(schema).__name__}")
        llg = _llguidance()
        compiled = closed_objects(schema)
        if isinstance(schema, dict) and "x-guidance" not in schema:
            # JSON's whitespace, at most WHITESPACE_RUN characters at a time: enough for a model's
            # own indentation, too little to loop in (a small model can emit newlines forever)
            compiled = {**compiled, "x-guidance": {"whitespace_pattern": WHITESPACE}}
        try:
            source = llg.LLMatcher.grammar_from_json_schema(compiled)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise BadArgumentError(f"the JSON schema is invalid: {_first_line(exc)}") from None
        return cls("json_schema", source, "the JSON schema", schema)

    @classmethod
    def json(cls) -> "Grammar":
        """Output any one JSON object."""
        grammar = cls.json_schema({"type": "object"})
        return cls("json", grammar.source, "a JSON object", grammar.schema)

    @classmethod
    def regex(cls, pattern: str) -> "Grammar":
        if not isinstance(pattern, str) or not pattern:
            raise BadArgumentError("the regex is empty; give a pattern")
        return cls("regex", _llguidance().LLMatcher.grammar_from_regex(pattern), f"the regex {pattern!r}")

    @classmethod
    def lark(cls, text: str) -> "Grammar":
        """A Lark grammar as llguidance reads it (`start:` rule; `%json {...}` embeds a
        schema); a GBNF grammar (llama.cpp's, `root ::= ...`) is converted first."""
        if not isinstance(text, str) or not text.strip():
            raise BadArgumentError("the grammar is empty; give a Lark or GBNF grammar")
        llg = _llguidance()
        if "::=" in text:
            from llguidance.gbnf_to_lark import any_to_lark

            try:
                text = any_to_lark(text)
            except Exception as exc:  # noqa: BLE001  (the converter raises plain Exceptions)
                raise BadArgumentError(f"the GBNF grammar does not parse: {_first_line(exc)}") from None
        return cls("lark", llg.LLMatcher.grammar_from_lark(text), "the grammar")

    @classmethod
    def from_options(cls, json_schema=None, grammar=None, regex=None, json=False) -> "Grammar | None":
        """The Grammar for Model.generate's json_schema= / grammar= / regex= / json=True."""
        given = [name for name, value in (("json_schema", json_schema), ("grammar", grammar), ("regex", regex),
                                          ("json", json or None)) if value is not None]
        if len(given) > 1:
            raise BadArgumentError(f"{' and '.join(given)} each constrain the output; give one")
        if json_schema is not None:
            return cls.json_schema(json_schema)
        if grammar is not None:
            return grammar if isinstance(grammar, Grammar) else cls.lark(grammar)
        if regex is not None:
            return cls.regex(regex)
        return cls.json() if json else None

    def check(self, model: "Model") -> None:
        """Compile against `model`'s tokenizer now: BadArgumentError (one line, naming the
        schema path at fault) rather than at the first token."""
        Constraint(model, self).close()


class Constraint:
    """One generation's matcher: mask the next token's logits, follow the tokens drawn."""

    def __init__(self, model: "Model", grammar: Grammar):
        llg = _llguidance()
        self.grammar, self.vocab = grammar, model.vocab_size
        self.matcher = llg.LLMatcher(_tokenizer(model), grammar.source)
        if self.matcher.is_error():
            raise BadArgumentError(_explain(model, grammar, self.matcher.get_error()))
        self._words = np.zeros((self.vocab + 31) // 32, dtype=np.int32)
        self._fresh = False  # _words holds the mask of the matcher's current state
        self._stopped, self._accepting = self.matcher.is_stopped(), self.matcher.is_accepting()
        self._pending: Pending | None = _masks().submit(self._fill)  # beside the prefill

    # ---- the mask ----------------------------------------------------------------------------
    def _fill(self) -> None:
        self.matcher.unsafe_compute_mask_ptr(self._words.ctypes.data, self._words.nbytes)

    def _settle(self) -> None:
        """Wait for the mask in flight (the matcher is not re-entrant), or compute it."""
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._fresh = True
        elif not self._fresh:
            self._fill()
            self._fresh = True

    def allowed(self) -> np.ndarray:
        """(vocab,) bool: the tokens the grammar allows next."""
        self._settle()
        return np.unpackbits(self._words.view(np.uint8), bitorder="little")[: self.vocab].astype(bool)

    def mask(self, logits: np.ndarray) -> np.ndarray:
        """A copy of `logits` with every token the grammar forbids at -inf."""
        allowed = self.allowed()
        if not allowed.any():
            raise BadArgumentError(f"{self.grammar.description} allows no token here: "
                                   f"{self.matcher.get_error() or 'the grammar cannot go on'}")
        out = np.where(allowed, logits[: self.vocab], np.float32(-np.inf)).astype(logits.dtype, copy=False)
        if len(logits) > self.vocab:  # a graph padded past the tokenizer
            out = np.concatenate([out, np.full(len(logits) - self.vocab, -np.inf, logits.dtype)])
        return out

    # ---- following the tokens ---------------------------------------------------------------
    def consume(self, token: int) -> None:
        """The token drawn; the next mask starts computing at once (on a worker)."""
        self._settle()
        if not self.matcher.consume_token(int(token)):
            raise BadArgumentError(f"token {token} breaks {self.grammar.description}: {self.matcher.get_error()}")
        self._fresh = False
        # read here, while no mask is computing: the matcher takes one caller at a time
        self._stopped, self._accepting = self.matcher.is_stopped(), self.matcher.is_accepting()
        self._pending = None if self._stopped else _masks().submit(self._fill)

    def valid_prefix(self, tokens: Sequence[int]) -> int:
        """How many of `tokens` (drafts) the grammar would take from here."""
        if not tokens:
            return 0
        self._settle()
        return self.matcher.validate_tokens([int(t) for t in tokens])

    @property
    def done(self) -> bool:
        """The grammar is complete and takes no more tokens (the end-of-turn token included)."""
        return self._stopped

    @property
    def accepting(self) -> bool:
        """The output so far is complete (more may follow)."""
        return self._accepting

    def close(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None
            self._fresh = True


class ConstrainedSampler:
    """A sampler whose logits go through a Constraint first; the tokens it returns are
    consumed by the constraint (accepted drafts and the model's own token alike)."""

    def __init__(self, sampler, constraint: Constraint):
        self.sampler, self.constraint = sampler, constraint
        self.params = sampler.params

    def __call__(self, logits: np.ndarray, history: np.ndarray) -> int:
        token = self.sampler(self.constraint.mask(logits), history)
        self.constraint.consume(token)
        return token

    def verify(self, logits: np.ndarray, history: np.ndarray, draft: int) -> tuple[int, bool]:
        token, ok = self.sampler.verify(self.constraint.mask(logits), history, draft)
        self.constraint.consume(token)
        return token, ok


# ---- tokenizer bridge and error messages --------------------------------------------------------

def _tokenizer(model: "Model"):
    """llguidance's view of the model's tokenizer, made once per Model (~0.4 s for SmolLM2)."""
    cached = getattr(model, "_llguidance_tokenizer", None)
    if cached is not None:
        return cached
    with _TOKENIZERS_LOCK:
        cached = getattr(model, "_llguidance_tokenizer", None)
        if cached is None:
            llg = _llguidance()
            eos = list(model.eos_token_ids) or None
            cached = llg.LLTokenizer(model.tokenizer.to_str(), n_vocab=model.vocab_size, eos_token=eos)
            model._llguidance_tokenizer = cached
    return cached


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]


_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_ONE = ("items", "additionalProperties", "not", "contains", "if", "then", "else",
                  "propertyNames", "unevaluatedProperties", "unevaluatedItems", "additionalItems")


def _explain(model: "Model", grammar: Grammar, error: str) -> str:
    """The engine's message, plus where in the schema: the deepest subschema that fails to
    compile on its own (with the root's definitions, so $refs still resolve)."""
    error = " ".join(error.split())[:300]
    if grammar.kind != "json_schema" or not isinstance(grammar.schema, dict):
        return f"{grammar.description} is invalid: {error}"
    path = _failing_path(model, grammar.schema)
    where = f" at {path}" if path else ""
    return f"the JSON schema is invalid{where}: {error}"


def _failing_path(model: "Model", root: dict) -> str:
    llg = _llguidance()
    tok = _tokenizer(model)
    defs = {k: root[k] for k in ("$defs", "definitions") if k in root}

    def fails(schema) -> bool:
        if isinstance(schema, dict):
            schema = {**defs, **schema}
        try:
            source = llg.LLMatcher.grammar_from_json_schema(schema)
            return llg.LLMatcher(tok, source).is_error()
        except Exception:  # noqa: BLE001  (any refusal counts as failing)
            return True

    def children(schema: dict):
        for key in _SUBSCHEMA_MAPS:
            if isinstance(schema.get(key), dict):
                for name, sub in schema[key].items():
                    yield f"/{key}/{_escape(name)}", sub
        for key in _SUBSCHEMA_LISTS:
            if isinstance(schema.get(key), list):
                for i, sub in enumerate(schema[key]):
                    yield f"/{key}/{i}", sub
        for key in _SUBSCHEMA_ONE:
            sub = schema.get(key)
            if isinstance(sub, dict):
                yield f"/{key}", sub
            elif key == "items" and isinstance(sub, list):
                for i, item in enumerate(sub):
                    yield f"/items/{i}", item

    def deepest(schema, path: str, depth: int = 0) -> str:
        if depth > 32 or not isinstance(schema, dict):
            return path
        for sub_path, sub in children(schema):
            if isinstance(sub, (dict, bool)) and not sub_path.startswith(("/$defs", "/definitions")) and fails(sub):
                return deepest(sub, path + sub_path, depth + 1)
        for sub_path, sub in children(schema):  # a broken definition reached through a $ref
            if sub_path.startswith(("/$defs", "/definitions")) and isinstance(sub, dict) and fails(sub):
                return deepest(sub, path + sub_path, depth + 1)
        return path

    found = deepest(root, "")
    return found


def closed_objects(schema, member_of_all_of: bool = False):
    """`schema` with `"additionalProperties": false` on every object schema that lists its
    `properties` and says nothing about others — what llama.cpp's schema converter and
    OpenAI's strict mode generate. Every output still validates against the schema as given;
    it only stops a model from inventing properties (on SmolLM2, 59 of 129 generations added
    some, 45 of them until the token limit). An `allOf` member is left open: closing each
    part would forbid the other parts' properties."""
    if isinstance(schema, list):
        return [closed_objects(s, member_of_all_of) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {}
    for key, value in schema.items():
        if key in _SUBSCHEMA_MAPS and isinstance(value, dict):
            out[key] = {name: closed_objects(sub) for name, sub in value.items()}
        elif key == "allOf" and isinstance(value, list):
            out[key] = [closed_objects(sub, member_of_all_of=True) for sub in value]
        elif key in _SUBSCHEMA_LISTS + _SUBSCHEMA_ONE:
            out[key] = closed_objects(value)
        else:
            out[key] = value
    open_keys = ("additionalProperties", "unevaluatedProperties", "patternProperties", "allOf")
    if "properties" in out and not member_of_all_of and not any(k in out for k in open_keys):
        out["additionalProperties"] = False
    return out


def _escape(name: str) -> str:
    return str(name).replace("~", "~0").replace("/", "~1")
