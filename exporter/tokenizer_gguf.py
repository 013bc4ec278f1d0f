"""Tokenizer files from GGUF metadata.

The ``tokenizer.ggml.*`` keys are rebuilt into a ``tokenizers`` tokenizer.json that encodes the
way llama.cpp does (llama.cpp is what a GGUF file is made for, so it is the reference).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..runtime.errors import BadModelFileError, UnsupportedModelError
from .tokenizer import TokenizerFiles, end_token_ids, make_tokenizer_config, special_token_template, with_post_processor

_KEY = "tokenizer.ggml."

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
# Token types llama.cpp cuts out of the text whole before tokenizing the rest.
_MATCHED_WHOLE = (_UNKNOWN, _CONTROL, _USER_DEFINED)

# Regexes from llama.cpp's llama-vocab.cpp (llm_tokenizer_bpe): each is applied in turn to the
# pieces the previous one left, and text no regex matches stays a piece of its own.
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken, as written in its tokenizer.json (llama.cpp rewrites it only for std::regex).
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_BLOOM_SPLIT = r" ?[^(\s|.,!?…。，、।۔،)]+"


@dataclass(frozen=True)
class _BpePreTokenizer:
    """How llama.cpp treats byte-level BPE text for one value of tokenizer.ggml.pre."""

    splits: tuple[str, ...]
    ignore_merges: bool = False  # a piece that is a whole vocabulary token is taken as it is
    add_bos: bool = False  # llama.cpp's add_bos when the file has no add_bos_token key


_DEFAULT = _BpePreTokenizer((r"[\p{P}\$\+<=>\^~\|]+", _GPT2_SPLIT, r"\p{N}+", r"[0-9][0-9][0-9]"))
_GPT2 = _BpePreTokenizer((_GPT2_SPLIT,))
_DIGITS_THEN_GPT2 = _BpePreTokenizer((r"\p{N}", _GPT2_SPLIT))  # StarCoder family, SmolLM
_LLAMA3 = _BpePreTokenizer((_LLAMA3_SPLIT,), ignore_merges=True, add_bos=True)
_QWEN2 = _BpePreTokenizer((_QWEN2_SPLIT,))

_BPE_PRE_TOKENIZERS: dict[str, _BpePreTokenizer] = {
    "default": _DEFAULT,
    # "gpt2" is not a name llama.cpp writes ("gpt-2" is); accepted as the obvious alias.
    **dict.fromkeys(("gpt-2", "gpt2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais"), _GPT2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b"),
                    _DIGITS_THEN_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3"), _LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _BpePreTokenizer((_LLAMA3_SPLIT,))),
    **dict.fromkeys(("qwen2", "stablelm2", "megrez", "deepseek-r1-qwen"), _QWEN2),
    "tekken": _BpePreTokenizer((_TEKKEN_SPLIT,), ignore_merges=True, add_bos=True),
    "falcon": _BpePreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2_SPLIT, r"[0-9][0-9][0-9]")),
    **dict.fromkeys(("poro-chat", "bloom", "gpt3-finnish"), _BpePreTokenizer((_BLOOM_SPLIT,))),
    "viking": _BpePreTokenizer((_BLOOM_SPLIT, r"\p{N}")),
}

# llama.cpp's special token ids for a sentencepiece vocabulary that names none.
_SPM_DEFAULT_IDS = {"bos": 1, "eos": 2, "unk": 0}


class _GgufVocab(NamedTuple):
    tokens: list[str]
    token_types: list[int]
    scores: list[float] | None
    merges: list[str] | None


class _SpecialIds(NamedTuple):
    bos: int | None
    eos: int | None
    unk: int | None
    pad: int | None
    eot: int | None
    eom: int | None


class _Built(NamedTuple):
    tokenizer: Tokenizer
    add_bos_default: bool  # what llama.cpp does when the file has no add_bos_token key


def tokenizer_from_gguf(metadata: Mapping[str, Any]) -> TokenizerFiles:
    """Tokenizer files from a GGUF file's metadata (key -> value, arrays as lists)."""
    model = _required(metadata, "model", str)
    builder = _gguf_builder(model)
    vocab = _gguf_vocab(metadata)
    ids = _gguf_special_ids(metadata, model, len(vocab.tokens))
    built = builder(metadata, vocab, ids)
    add_bos, add_eos = _gguf_add_flags(metadata, built.add_bos_default, ids)
    bos, eos = _token_at(vocab, ids.bos), _token_at(vocab, ids.eos)
    template = special_token_template(bos if add_bos else None, eos if add_eos else None)
    tokenizer_json = with_post_processor(built.tokenizer.to_str(), template, "GGUF tokenizer metadata")
    chat_template = metadata.get("tokenizer.chat_template")
    chat_template = chat_template if isinstance(chat_template, str) else None

    tokenizer_config = make_tokenizer_config(
        bos=bos[0] if bos else None,
        eos=eos[0] if eos else None,
        unk=vocab.tokens[ids.unk] if ids.unk is not None else None,
        pad=vocab.tokens[ids.pad] if ids.pad is not None else None,
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=chat_template,
        max_length=_gguf_context_length(metadata),
    )
    return TokenizerFiles(
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        chat_template=chat_template,
        bos_token_id=ids.bos,
        eos_token_ids=end_token_ids([ids.eos, ids.eot, ids.eom], built.tokenizer, chat_template),
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


def _gguf_builder(model: str):
    builder = _GGUF_BUILDERS.get(model)
    if builder is None:
        raise UnsupportedModelError(
            f"GGUF {_KEY}model = {model!r}: this tokenizer kind is not supported "
            f"(supported: {', '.join(sorted(_GGUF_BUILDERS))}); export from the Hugging Face folder instead"
        )
    return builder


def _token_at(vocab: _GgufVocab, index: int | None) -> tuple[str, int] | None:
    return (vocab.tokens[index], index) if index is not None else None


# --- reading the keys ---


def _required(metadata: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    key = _KEY + name
    if key not in metadata:
        raise BadModelFileError(
            f"GGUF metadata has no {key!r}, so the file carries no usable tokenizer; "
            "re-convert the model with llama.cpp's convert_hf_to_gguf.py or export from the Hugging Face folder"
        )
    value = metadata[key]
    if not isinstance(value, kind):
        raise BadModelFileError(f"GGUF {key} has the wrong type ({type(value).__name__}); re-convert the model")
    return value


def _optional_list(metadata: Mapping[str, Any], name: str, length: int | None, kind: type | tuple[type, ...]) -> list | None:
    """The array `name` (every element a `kind`, `length` of them when given), or None if absent."""
    key = _KEY + name
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise BadModelFileError(f"GGUF {key} is not an array of {_kind_name(kind)}; the file is damaged, re-convert the model")
    value = list(value)
    if length is not None and len(value) != length:
        raise BadModelFileError(
            f"GGUF {key} has {len(value)} entries for {length} tokens; the file is damaged, re-convert the model"
        )
    return value


def _gguf_vocab(metadata: Mapping[str, Any]) -> _GgufVocab:
    tokens = [str(token) for token in _required(metadata, "tokens", (list, tuple))]
    if not tokens:
        raise BadModelFileError(f"GGUF {_KEY}tokens is empty; re-convert the model")
    # llama.cpp renames empty tokens the same way, so they cannot collide with real text.
    tokens = [token or f"[EMPTY_{index}]" for index, token in enumerate(tokens)]
    duplicates = len(tokens) - len(set(tokens))
    if duplicates:
        raise BadModelFileError(
            f"GGUF {_KEY}tokens lists {duplicates} token(s) twice; llama.cpp refuses such a file too, re-convert it"
        )
    types = _optional_list(metadata, "token_type", len(tokens), int)
    scores = _optional_list(metadata, "scores", len(tokens), (int, float))
    merges = _optional_list(metadata, "merges", None, str)
    return _GgufVocab(
        tokens=tokens,
        token_types=types if types is not None else [_NORMAL] * len(tokens),
        scores=[float(score) for score in scores] if scores is not None else None,
        merges=merges,
    )


def _kind_name(kind: type | tuple[type, ...]) -> str:
    return {int: "integers", str: "strings"}.get(kind, "numbers")


def _gguf_special_ids(metadata: Mapping[str, Any], model: str, n_tokens: int) -> _SpecialIds:
    defaults = _SPM_DEFAULT_IDS if model == "llama" else {}

    def read(name: str, key: str) -> int | None:
        value = metadata.get(f"{_KEY}{key}", defaults.get(name))
        if value is None:
            return None
        if not isinstance(value, int) or isinstance(value, bool):
            raise BadModelFileError(f"GGUF {_KEY}{key} = {value!r} is not a token id; re-convert the model")
        if not 0 <= value < n_tokens:
            raise BadModelFileError(
                f"GGUF {_KEY}{key} = {value} is outside the vocabulary of {n_tokens} tokens; re-convert the model"
            )
        return int(value)

    return _SpecialIds(
        bos=read("bos", "bos_token_id"),
        eos=read("eos", "eos_token_id"),
        unk=read("unk", "unknown_token_id"),
        pad=read("pad", "padding_token_id"),
        eot=read("eot", "eot_token_id"),
        eom=read("eom", "eom_token_id"),
    )


def _gguf_flag(metadata: Mapping[str, Any], name: str, default: bool) -> bool:
    value = metadata.get(_KEY + name)
    return default if value is None else bool(value)


def _gguf_add_flags(metadata: Mapping[str, Any], add_bos_default: bool, ids: _SpecialIds) -> tuple[bool, bool]:
    add_bos = _gguf_flag(metadata, "add_bos_token", add_bos_default)
    add_eos = _gguf_flag(metadata, "add_eos_token", False)
    for flag, index, flag_name, id_name in (
        (add_bos, ids.bos, "add_bos_token", "bos_token_id"),
        (add_eos, ids.eos, "add_eos_token", "eos_token_id"),
    ):
        if flag and index is None:
            raise BadModelFileError(
                f"GGUF {_KEY}{flag_name} is true but {_KEY}{id_name} is missing; re-convert the model"
            )
    return add_bos, add_eos


def _gguf_context_length(metadata: Mapping[str, Any]) -> int | None:
    value = metadata.get(f"{metadata.get('general.architecture')}.context_length")
    return int(value) if isinstance(value, int) and value > 0 else None


def _added_tokens(vocab: _GgufVocab) -> list[AddedToken]:
    """Tokens llama.cpp matches whole in the text: control and unknown ones as special, user-defined
    ones as plain added tokens (so decode keeps them)."""
    return [
        AddedToken(token, special=kind != _USER_DEFINED, normalized=False)
        for token, kind in zip(vocab.tokens, vocab.token_types)
        if kind in _MATCHED_WHOLE
    ]


# --- "gpt2": byte-level BPE ---


def _build_byte_level_bpe(metadata: Mapping[str, Any], vocab: _GgufVocab, ids: _SpecialIds) -> _Built:
    pre_name = metadata.get(_KEY + "pre") or "default"  # llama.cpp falls back to "default" too
    pre = _BPE_PRE_TOKENIZERS.get(pre_name) if isinstance(pre_name, str) else None
    if pre is None:
        raise UnsupportedModelError(
            f"GGUF {_KEY}pre = {pre_name!r}: this pre-tokenizer is not supported "
            f"(supported: {', '.join(sorted(_BPE_PRE_TOKENIZERS))}); export from the Hugging Face folder instead"
        )
    if vocab.merges is None:
        raise BadModelFileError(
            f"GGUF metadata has no {_KEY}merges, which a gpt2 tokenizer needs; re-convert the model"
        )
    token_ids = {token: index for index, token in enumerate(vocab.tokens)}
    tokenizer = Tokenizer(
        models.BPE(
            vocab=token_ids,
            merges=_usable_merges(vocab.merges, token_ids),
            ignore_merges=pre.ignore_merges,
            unk_token=vocab.tokens[ids.unk] if ids.unk is not None else None,
        )
    )
    # The regexes cut the raw text; ByteLevel then only maps bytes to its printable alphabet.
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(split), behavior="isolated") for split in pre.splits]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_tokens(_added_tokens(vocab))
    return _Built(tokenizer, pre.add_bos)


def _usable_merges(merges: Sequence[str], token_ids: Mapping[str, int]) -> list[tuple[str, str]]:
    """Merges as pairs, dropping those whose parts or result are not tokens.

    `tokenizers` refuses such merges; llama.cpp keeps them, but a merge that yields no token can only
    end in the per-character fallback, so dropping it changes nothing for real vocabularies. The
    split is at the first space after the first character, as in llama.cpp (a part may be a space).
    """
    pairs = []
    for merge in merges:
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        left, right = merge[:cut], merge[cut + 1 :]
        if left in token_ids and right in token_ids and left + right in token_ids:
            pairs.append((left, right))
    return pairs


# --- "llama": sentencepiece BPE with scores ---


def _build_sentencepiece_bpe(metadata: Mapping[str, Any], vocab: _GgufVocab, ids: _SpecialIds) -> _Built:
    if vocab.scores is None:
        raise BadModelFileError(
            f"GGUF metadata has no {_KEY}scores, which a llama (sentencepiece) tokenizer needs; re-convert the model"
        )
    token_ids = {token: index for index, token in enumerate(vocab.tokens)}
    has_bytes = _BYTE in vocab.token_types
    tokenizer = Tokenizer(
        models.BPE(
            vocab=token_ids,
            merges=_merges_from_scores(vocab.tokens, vocab.scores),
            unk_token=vocab.tokens[ids.unk] if ids.unk is not None else None,
            fuse_unk=True,
            byte_fallback=has_bytes,
        )
    )
    add_space_prefix = _gguf_flag(metadata, "add_space_prefix", True)
    tokenizer.normalizer = _sentencepiece_normalizer(add_space_prefix)
    tokenizer.decoder = _sentencepiece_decoder(add_space_prefix)
    tokenizer.add_tokens(_added_tokens(vocab))
    return _Built(tokenizer, add_bos_default=True)


def _merges_from_scores(tokens: Sequence[str], scores: Sequence[float]) -> list[tuple[str, str]]:
    """BPE merges equivalent to sentencepiece's "merge the best-scoring pair that forms a token".

    Every way to cut a token in two known tokens is a merge, ranked by the token's score, best first
    (ties: longer left part first, then lower ids), which is transformers' `generate_merges` order.
    """
    token_ids = {token: index for index, token in enumerate(tokens)}
    merges = []
    for token, score in zip(tokens, scores):
        cuts = [
            (token[:cut], token[cut:])
            for cut in range(1, len(token))
            if token[:cut] in token_ids and token[cut:] in token_ids
        ]
        cuts.sort(key=lambda pair: (token_ids[pair[0]], token_ids[pair[1]]))
        merges.extend((score, left, right) for left, right in cuts)
    merges.sort(key=lambda merge: (merge[0], len(merge[1]), len(merge[2])), reverse=True)
    return [(left, right) for _, left, right in merges]


def _sentencepiece_normalizer(add_space_prefix: bool) -> normalizers.Normalizer:
    """Spaces become "▁"; with add_space_prefix each stretch of text gets one in front.

    A normalizer rather than a Metaspace pre-tokenizer: it runs on each piece between special tokens
    (llama.cpp prefixes the text after every special token too) and it always prepends, even before
    a leading space, where Metaspace would not (" hi" must be "▁▁hi", as in sentencepiece).
    """
    replace = normalizers.Replace(" ", "▁")
    if not add_space_prefix:
        return replace
    return normalizers.Sequence([normalizers.Prepend("▁"), replace])


def _sentencepiece_decoder(add_space_prefix: bool) -> decoders.Decoder:
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_space_prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))  # drop the prefix space again
    return decoders.Sequence(steps)


_GGUF_BUILDERS = {
    "gpt2": _build_byte_level_bpe,
    "llama": _build_sentencepiece_bpe,
}
