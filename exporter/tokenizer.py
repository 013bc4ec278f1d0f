"""The tokenizer files of an exported model folder.

Two sources, one result (``TokenizerFiles``): a Hugging Face folder (tokenizer_hf.py) or GGUF
metadata (tokenizer_gguf.py). This module holds the result, its writer and the pieces both
sources build it from.

Only JSON and GGUF values are read. Nothing is unpickled (no ``tokenizer.model``) and no code from
the folder is imported or run (``auto_map`` is ignored).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..runtime import contract as io
from ..runtime.errors import BadModelFileError


# Tokens that end a chat turn. A chat template that writes one of them means generation should stop
# there too, even when the file names another token as EOS (SmolLM2 and Qwen say <|endoftext|> or
# <|im_end|>; Llama 3 says <|end_of_text|> but its template ends turns with <|eot_id|>).
_END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer_json: str  # full text of a Hugging Face `tokenizers` tokenizer.json
    tokenizer_config: dict  # what goes into tokenizer_config.json
    chat_template: str | None
    bos_token_id: int | None
    eos_token_ids: list[int]  # EOS first, then the other tokens that end generation
    add_bos_token: bool
    add_eos_token: bool


def write_tokenizer(files: TokenizerFiles, out_dir: Path) -> None:
    """Write tokenizer.json, tokenizer_config.json and, if there is one, chat_template.jinja."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / io.TOKENIZER_NAME).write_text(files.tokenizer_json, encoding="utf-8")
    config_text = json.dumps(files.tokenizer_config, indent=2, ensure_ascii=False) + "\n"
    (out_dir / io.TOKENIZER_CONFIG_NAME).write_text(config_text, encoding="utf-8")
    if files.chat_template is not None:
        (out_dir / io.CHAT_TEMPLATE_NAME).write_text(files.chat_template, encoding="utf-8")


# --------------------------------------------------------------------------------------------
# Shared pieces
# --------------------------------------------------------------------------------------------


def special_token_template(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> dict:
    """A TemplateProcessing post-processor (as JSON) that adds BOS before and EOS after the text.

    Written as JSON rather than through ``processors.TemplateProcessing("<s>:0 $A:0")`` because that
    string form cannot hold a token whose text contains a space or a colon.
    """

    def piece(token: tuple[str, int], type_id: int) -> dict:
        return {"SpecialToken": {"id": token[0], "type_id": type_id}}

    def sequence(type_id: int) -> list[dict]:
        seq_id = "A" if type_id == 0 else "B"
        return (
            ([piece(bos, type_id)] if bos else [])
            + [{"Sequence": {"id": seq_id, "type_id": type_id}}]
            + ([piece(eos, type_id)] if eos else [])
        )

    used = [token for token in (bos, eos) if token]
    return {
        "type": "TemplateProcessing",
        "single": sequence(0),
        "pair": sequence(0) + sequence(1),
        "special_tokens": {text: {"id": text, "ids": [index], "tokens": [text]} for text, index in used},
    }


def with_post_processor(tokenizer_json: str, post_processor: dict, source: str | Path) -> str:
    document = json.loads(tokenizer_json)
    document["post_processor"] = post_processor
    text = json.dumps(document, ensure_ascii=False)
    parse_tokenizer(text, source)
    return text


def parse_tokenizer(text: str, source: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_str(text)
    except Exception as err:  # tokenizers raises plain Exception subclasses with Rust messages
        raise BadModelFileError(
            f"{source}: not a valid Hugging Face tokenizers file ({err}); "
            "re-save the tokenizer with transformers' save_pretrained"
        ) from err


def end_token_ids(named: Iterable[int | None], tokenizer: Tokenizer, chat_template: str | None) -> list[int]:
    """The EOS ids the files name, in order, then the end-of-turn tokens the chat template writes."""
    ids = [index for index in named if index is not None]
    for text in _END_OF_TURN_TOKENS:
        index = tokenizer.token_to_id(text)
        if chat_template and text in chat_template and index is not None:
            ids.append(index)
    return list(dict.fromkeys(ids))


def make_tokenizer_config(
    *,
    bos: str | None,
    eos: str | None,
    unk: str | None,
    pad: str | None,
    add_bos: bool,
    add_eos: bool,
    chat_template: str | None,
    max_length: int | None,
) -> dict:
    config: dict[str, Any] = {
        # The generic class: it uses tokenizer.json as written, which is the point.
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
    }
    if max_length is not None:
        config["model_max_length"] = max_length
    if chat_template is not None:
        config["chat_template"] = chat_template
    return config

