"""Constrained decoding (runtime/constrain.py on llguidance): the mask only removes what the
grammar forbids, works with sampling, stop strings, the token budget and speculation, and
bad grammars fail in one line naming where."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from edgellama.runtime.constrain import Grammar
from edgellama.runtime.contract import KVLayout
from edgellama.runtime.errors import BadArgumentError
from tests.conftest import tiny_model_of_layout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_of_layout(tmp_path_factory, KVLayout.SHARED)


PROMPT = "The quick brown fox"


def test_allowed_logits_are_left_exactly_as_they_were(tiny):
    """The mask only sets forbidden tokens to -inf: the allowed ones keep their logits bit
    for bit, so greedy picks the unconstrained argmax whenever the grammar allows it (the
    real model's greedy JSON answer is unchanged: test_real_model_json_schema_keeps_...)."""
    from edgellama.runtime.constrain import Constraint, ConstrainedSampler
    from edgellama.runtime.sampling import SamplingParams, make_sampler

    rng = np.random.default_rng(0)
    c = Constraint(tiny, Grammar.regex("[a-z ]*"))
    for _ in range(5):
        logits = rng.normal(size=tiny.vocab_size).astype(np.float32)
        allowed = c.allowed()
        masked = c.mask(logits)
        assert np.array_equal(masked[allowed], logits[allowed]) and np.isneginf(masked[~allowed]).all()
        best = int(np.argmax(np.where(allowed, logits, -np.inf)))
        token = ConstrainedSampler(make_sampler(SamplingParams()), c)(logits, np.zeros(0, np.int64))
        assert token == best
    c.close()


def test_the_mask_removes_exactly_what_the_grammar_forbids(tiny):
    from edgellama.runtime.constrain import Constraint

    c = Constraint(tiny, Grammar.regex("(fox|dog) jumps"))
    logits = np.zeros(tiny.vocab_size, np.float32)
    masked = c.mask(logits)
    allowed = np.flatnonzero(np.isfinite(masked))
    texts = {tiny.tokenizer.decode([int(t)]) for t in allowed}
    assert allowed.size and all("fox jumps".startswith(t) or "dog jumps".startswith(t) for t in texts), texts
    c.close()


def test_output_matches_under_sampling_and_a_seed_repeats_it(tiny):
    pattern = r"(yes|no|maybe)(, (yes|no|maybe)){2}\."
    runs = [tiny.generate_text(PROMPT, max_new_tokens=40, temperature=1.0, seed=s, regex=pattern) for s in (1, 1, 2, 3)]
    assert runs[0] == runs[1]
    assert all(re.fullmatch(pattern, r) for r in runs), runs


@pytest.mark.parametrize("speculate", [None, "ngram"])
def test_json_schema_output_validates(tiny, speculate):
    import jsonschema

    schema = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                               "b": {"enum": ["x", "y"]}},
              "required": ["a", "b"], "additionalProperties": False}
    gen = tiny.generate(PROMPT, max_new_tokens=256, json_schema=schema, speculate=speculate)
    for _ in gen:
        pass
    assert gen.finish_reason == "stop", gen.text
    jsonschema.validate(json.loads(gen.text), schema)


def test_speculation_keeps_the_constrained_greedy_output(tiny):
    grammar = Grammar.regex("[a-z ]{0,60}")
    plain = tiny.generate_text(PROMPT * 3, max_new_tokens=40, constraint=grammar)
    spec = tiny.generate(PROMPT * 3, max_new_tokens=40, constraint=grammar, speculate="ngram", draft_tokens=4)
    for _ in spec:
        pass
    assert spec.text == plain and spec.speculation.forwards > 0


def test_stop_strings_and_the_token_budget(tiny):
    gen = tiny.generate(PROMPT, max_new_tokens=5, regex="[a-z ]*", ignore_eos=True)
    for _ in gen:
        pass
    assert gen.finish_reason == "length" and gen.completion_tokens == 5
    long = tiny.generate_text(PROMPT, max_new_tokens=30, regex="[a-z ]*", ignore_eos=True)
    stop = long.strip()[:2]
    cut = tiny.generate(PROMPT, max_new_tokens=30, regex="[a-z ]*", ignore_eos=True, stop=[stop])
    for _ in cut:
        pass
    assert cut.finish_reason == "stop" and stop not in cut.text and long.startswith(cut.text)


def test_a_finished_grammar_ends_the_generation(tiny):
    gen = tiny.generate(PROMPT, max_new_tokens=30, regex="(cat|dog)", ignore_eos=True)
    for _ in gen:
        pass
    assert gen.text in ("cat", "dog") and gen.finish_reason == "stop"


@pytest.mark.parametrize("schema, where", [
    ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "at /properties/a: Invalid type: strnig"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/gone"}}}, "at /properties/a"),
    ({"type": "array", "items": {"type": "string", "format": "weird"}}, "at /items: Unknown format: weird"),
    ({"anyOf": [{"type": "string"}, {"type": "object", "properties": {"z": {"type": "string", "pattern": "(x"}}}]},
     "at /anyOf/1/properties/z"),
])
def test_a_bad_schema_names_its_path(tiny, schema, where):
    with pytest.raises(BadArgumentError) as err:
        Grammar.json_schema(schema).check(tiny)
    message = str(err.value)
    assert message.startswith("the JSON schema is invalid ") and where in message and "\n" not in message


def test_bad_options_are_one_line_errors(tiny):
    with pytest.raises(BadArgumentError, match="json_schema and regex each constrain the output; give one"):
        tiny.generate(PROMPT, json_schema={"type": "object"}, regex="a")
    with pytest.raises(BadArgumentError, match="the JSON schema is not JSON"):
        Grammar.json_schema("{nope")
    with pytest.raises(BadArgumentError, match="the regex is empty"):
        Grammar.regex("")
    with pytest.raises(BadArgumentError, match="is invalid"):
        Grammar.lark("start: undefined_rule").check(tiny)


def test_gbnf_is_converted(tiny):
    out = tiny.generate_text(PROMPT, max_new_tokens=20, grammar='root ::= "answer: " ("yes" | "no")')
    assert out in ("answer: yes", "answer: no")


def test_cli_flags(tiny, tmp_path):
    from click.testing import CliRunner

    from edgellama.cli import main

    schema = tmp_path / "s.json"
    schema.write_text(json.dumps({"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
                                  "additionalProperties": False}))
    r = CliRunner().invoke(main, ["run", str(tiny.folder), PROMPT, "--raw", "--json-schema", str(schema), "-n", "40"])
    assert r.exit_code == 0, r.stderr
    assert set(json.loads(r.stdout)) == {"n"}
    r = CliRunner().invoke(main, ["run", str(tiny.folder), PROMPT, "--raw", "--regex", "(up|down)", "-n", "9"])
    assert r.exit_code == 0 and r.stdout.strip() in ("up", "down")
    both = CliRunner().invoke(main, ["run", str(tiny.folder), PROMPT, "--json", "--regex", "a"])
    assert both.exit_code == 2 and "--json and --regex each constrain the reply; give one" in both.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "object", "properties": {"a": {"type": "strnig"}}}')
    r = CliRunner().invoke(main, ["run", str(tiny.folder), PROMPT, "--json-schema", str(bad)])
    assert r.exit_code == 2 and r.stderr.count("\n") == 1 and "at /properties/a" in r.stderr


@pytest.mark.slow
def test_real_model_json_schema_keeps_a_valid_answer(smollm2_onnx):
    """On SmolLM2 fp32: the schema-constrained greedy answer equals the unconstrained one
    where that already fits the schema, and validates."""
    import jsonschema

    from edgellama.runtime.model import Model

    model = Model.load(smollm2_onnx, threads=2)
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer", "minimum": 0},
                                               "city": {"enum": ["Paris", "Berlin", "Rome"]}},
              "required": ["name", "age", "city"], "additionalProperties": False}
    ids = model.render_chat([{"role": "user", "content": "Give me a person who lives in Berlin as JSON with "
                                                         "name, age and city."}])
    plain = model.generate_text(ids, max_new_tokens=64)
    constrained = model.generate_text(ids, max_new_tokens=64, json_schema=schema)
    jsonschema.validate(json.loads(constrained), schema)
    assert constrained == plain


def test_objects_are_closed_unless_the_schema_says_otherwise(tiny):
    """Properties the schema does not list are not generated (as llama.cpp and OpenAI's
    strict mode do); the output still validates against the schema as given."""
    from edgellama.runtime.constrain import closed_objects

    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "integer"}}},
                                               "c": {"type": "array", "items": {"properties": {"d": {}}}}},
              "required": ["a"]}
    closed = closed_objects(schema)
    assert closed["additionalProperties"] is False
    assert closed["properties"]["a"]["additionalProperties"] is False
    assert closed["properties"]["c"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the caller's schema is not touched
    open_ = {"type": "object", "properties": {"a": {}}, "additionalProperties": {"type": "integer"}}
    assert closed_objects(open_) == open_
    parts = {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]}
    assert closed_objects(parts) == parts  # closing each part would forbid the other's properties
    assert closed_objects({"type": "object"}) == {"type": "object"}  # json=True stays any object
    for seed in (1, 2, 3):
        out = json.loads(tiny.generate_text(PROMPT, max_new_tokens=200, temperature=1.0, seed=seed,
                                            json_schema={"type": "object", "properties": {"n": {"type": "integer"}}}))
        assert set(out) <= {"n"}
