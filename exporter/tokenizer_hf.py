"""Tokenizer files from a Hugging Face folder.

Its ``tokenizer.json`` is reused; only where tokenizer_config.json's add_bos_token/add_eos_token
disagree with its post-processor is that rewritten, so that a plain ``Tokenizer.encode(text)``
adds the special tokens the model expects. Only JSON is read (no ``tokenizer.model``, no
``auto_map`` code).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from ..runtime import contract as io
from ..runtime.contract import find_chat_template, read_json_object
from ..runtime.errors import BadModelFileError
from .tokenizer import (TokenizerFiles, end_token_ids, make_tokenizer_config, parse_tokenizer, special_token_template, with_post_processor)


# transformers writes this (int(1e30)) as model_max_length when it does not know the limit.
_UNKNOWN_MAX_LENGTH = 10**12


def tokenizer_from_hf(folder: Path) -> TokenizerFiles:
    """Tokenizer files from a Hugging Face model folder (tokenizer.json is required)."""
    folder = Path(folder)
    source = folder / io.TOKENIZER_NAME
    config = _read_json(folder / io.TOKENIZER_CONFIG_NAME) or {}
    generation = _read_json(folder / io.GENERATION_CONFIG_NAME) or {}
    model_config = _read_json(folder / io.HF_CONFIG_NAME) or {}

    tokenizer_json = _add_named_special_tokens(_read_hf_tokenizer_json(folder), config, source)
    tokenizer = parse_tokenizer(tokenizer_json, source)
    chat_template = find_chat_template(folder)  # the same lookup as the runtime's
    bos = _hf_bos(tokenizer, config, model_config, generation)
    eos_ids = end_token_ids(
        [
            _id_of(tokenizer, _token_text(config.get("eos_token"))),
            *_id_list(generation.get("eos_token_id"), folder / io.GENERATION_CONFIG_NAME),
            *_id_list(model_config.get("eos_token_id"), folder / io.HF_CONFIG_NAME),
        ],
        tokenizer,
        chat_template,
    )
    eos = (tokenizer.id_to_token(eos_ids[0]), eos_ids[0]) if eos_ids else None
    tokenizer_json, add_bos, add_eos = _hf_bos_eos_rule(tokenizer_json, tokenizer, config, bos, eos, source)

    tokenizer_config = make_tokenizer_config(
        bos=bos[0] if bos else None,
        eos=eos[0] if eos else None,
        unk=_token_text(config.get("unk_token")),
        pad=_token_text(config.get("pad_token")),
        add_bos=add_bos,
        add_eos=add_eos,
        chat_template=chat_template,
        max_length=_hf_max_length(config, model_config),
    )
    return TokenizerFiles(
        tokenizer_json=tokenizer_json,
        tokenizer_config=tokenizer_config,
        chat_template=chat_template,
        bos_token_id=bos[1] if bos else None,
        eos_token_ids=eos_ids,
        add_bos_token=add_bos,
        add_eos_token=add_eos,
    )


def _read_hf_tokenizer_json(folder: Path) -> str:
    path = folder / io.TOKENIZER_NAME
    if not path.is_file():
        raise BadModelFileError(
            f"{path}: tokenizer.json missing; this tool does not read tokenizer.model (sentencepiece/pickle "
            "files). Load the tokenizer with transformers and save_pretrained() it into the folder, "
            "or export from the model's GGUF file"
        )
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise BadModelFileError(f"{path}: cannot read tokenizer.json ({err}); re-download the file") from err


def _read_json(path: Path) -> dict | None:
    """The JSON object in ``path``, or None when the file does not exist."""
    return read_json_object(path, path.name) if path.is_file() else None


def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _id_of(tokenizer: Tokenizer, text: str | None) -> int | None:
    return tokenizer.token_to_id(text) if text is not None else None


def _id_list(value: Any, source: Path) -> list[int]:
    """An ``eos_token_id`` entry: absent, an int or a list of ints."""
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    if not all(isinstance(item, int) and not isinstance(item, bool) for item in values):
        raise BadModelFileError(f"{source}: eos_token_id must be an integer or a list of integers, got {value!r}")
    return values


def _hf_bos(tokenizer: Tokenizer, config: dict, *id_sources: dict) -> tuple[str, int] | None:
    """BOS as (text, id): named in tokenizer_config.json, or only by id in config/generation_config."""
    text = _token_text(config.get("bos_token"))
    index = _id_of(tokenizer, text)
    if index is None:
        index = next((source["bos_token_id"] for source in id_sources if _is_id(source.get("bos_token_id"))), None)
    if index is None or tokenizer.id_to_token(index) is None:
        return None
    return tokenizer.id_to_token(index), index


def _is_id(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _add_named_special_tokens(tokenizer_json: str, config: dict, source: Path) -> str:
    """Make bos/eos/unk/pad of tokenizer_config.json special added tokens, as transformers does.

    transformers adds any named special token that tokenizer.json does not list, so "<s>" in a
    prompt becomes the BOS id instead of being cut into "<", "s", ">". We only add those already in
    the vocabulary: a new id would lie outside the model's embedding table.
    """
    tokenizer = parse_tokenizer(tokenizer_json, source)
    added = {token.content for token in tokenizer.get_added_tokens_decoder().values()}
    names = dict.fromkeys(_token_text(config.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token"))
    missing = [name for name in names if name and name not in added and tokenizer.token_to_id(name) is not None]
    if not missing:
        return tokenizer_json
    tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in missing])
    return tokenizer.to_str()


def _hf_bos_eos_rule(
    tokenizer_json: str,
    tokenizer: Tokenizer,
    config: dict,
    bos: tuple[str, int] | None,
    eos: tuple[str, int] | None,
    source: Path,
) -> tuple[str, bool, bool]:
    """Settle whether encode() adds BOS/EOS; returns the tokenizer.json that does so and the flags.

    What tokenizer.json's post-processor does is the default (transformers 5 uses it as is). An
    add_bos_token/add_eos_token written in tokenizer_config.json wins where it disagrees, as it did
    for transformers 4's Llama-family tokenizers, which rebuilt the post-processor from those flags;
    the post-processor is then rewritten so the runtime's plain encode() follows the flags.
    """
    does_bos, does_eos = _adds_bos_eos(tokenizer, bos, eos)
    want_bos = bool(config.get("add_bos_token", does_bos)) and bos is not None
    want_eos = bool(config.get("add_eos_token", does_eos)) and eos is not None
    if (want_bos, want_eos) == (does_bos, does_eos):
        return tokenizer_json, does_bos, does_eos
    template = special_token_template(bos if want_bos else None, eos if want_eos else None)
    return with_post_processor(tokenizer_json, template, source), want_bos, want_eos


def _adds_bos_eos(
    tokenizer: Tokenizer, bos: tuple[str, int] | None, eos: tuple[str, int] | None
) -> tuple[bool, bool]:
    """Whether tokenizer.json adds BOS / EOS, read off its behaviour on a probe text.

    Probing covers every post-processor kind (TemplateProcessing, Bert/Roberta, Sequence) at once.
    """
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a").ids
    start = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), None)
    if start is None:  # the post-processor rewrote the text itself; nothing to say about BOS/EOS
        return False, False
    before, after = full[:start], full[start + len(plain) :]
    return (bos is not None and bos[1] in before), (eos is not None and eos[1] in after)


def _hf_max_length(config: dict, model_config: dict) -> int | None:
    for value in (config.get("model_max_length"), model_config.get("max_position_embeddings")):
        if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < _UNKNOWN_MAX_LENGTH:
            return int(value)
    return None
