"""Model folders written by other tools, read into the same Manifest, and the
onnxruntime-genai config written beside ours so genai loads our folders too.

    read_manifest(folder)   edgellama.json, else genai_config.json (onnxruntime-genai's
                            builder), else config.json (`optimum-cli export onnx`)
    genai_config(manifest)  the genai_config.json of one of our folders
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from . import contract as io
from .contract import KVLayout, Manifest, read_json_object
from .errors import BadModelFileError


def read_manifest(folder: Path) -> Manifest:
    """The folder's Manifest, whoever wrote the folder."""
    folder = Path(folder)
    if (folder / io.MANIFEST_NAME).is_file():
        return Manifest.load(folder)
    if (folder / io.GENAI_CONFIG_NAME).is_file():
        return _from_genai(folder)
    if (folder / io.HF_CONFIG_NAME).is_file():
        return _from_optimum(folder)
    return Manifest.load(folder)  # raises: names the missing manifest


def _optional_json(path: Path) -> dict[str, Any]:
    return read_json_object(path) if path.is_file() else {}


def _ids(value: Any) -> list[int]:
    return [value] if isinstance(value, int) else list(value or [])


def _from_optimum(folder: Path) -> Manifest:
    cfg = read_json_object(folder / io.HF_CONFIG_NAME)
    gen = _optional_json(folder / io.GENERATION_CONFIG_NAME)
    tok_cfg = _optional_json(folder / io.TOKENIZER_CONFIG_NAME)
    try:
        heads, hidden = int(cfg["num_attention_heads"]), int(cfg["hidden_size"])
        return Manifest(
            architecture=(cfg.get("architectures") or ["unknown"])[0], num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden, num_heads=heads, num_kv_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads), vocab_size=int(cfg["vocab_size"]),
            context_length=int(cfg.get("max_position_embeddings", 2048)), dtype="fp32", weights="fp32",
            attention="standard", kv_buffer=KVLayout.CONCAT.value, bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=_ids(gen.get("eos_token_id", cfg.get("eos_token_id"))),
            add_bos_token=bool(tok_cfg.get("add_bos_token", False)), source={"format": "optimum"},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadModelFileError(f"{folder / io.HF_CONFIG_NAME}: cannot describe this model ({exc!r})") from None


def _from_genai(folder: Path) -> Manifest:
    path = folder / io.GENAI_CONFIG_NAME
    cfg = read_json_object(path)
    try:
        model, dec = cfg["model"], cfg["model"]["decoder"]
        if dec.get("filename", io.GRAPH_NAME) != io.GRAPH_NAME:
            raise BadModelFileError(f"{folder}: genai graph is {dec.get('filename')!r}; expected {io.GRAPH_NAME}")
        shared = bool(cfg.get("search", {}).get("past_present_share_buffer", False))
        return Manifest(
            architecture=str(model.get("type", "unknown")), num_layers=int(dec["num_hidden_layers"]),
            hidden_size=int(dec["hidden_size"]), num_heads=int(dec["num_attention_heads"]),
            num_kv_heads=int(dec["num_key_value_heads"]), head_dim=int(dec["head_size"]),
            vocab_size=int(model["vocab_size"]), context_length=int(model["context_length"]),
            dtype="fp32", weights="unknown", attention="gqa" if shared else "standard",
            kv_buffer=(KVLayout.SHARED if shared else KVLayout.CONCAT).value,
            bos_token_id=model.get("bos_token_id"), eos_token_ids=_ids(model.get("eos_token_id")),
            add_bos_token=False, source={"format": "onnxruntime-genai"},
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BadModelFileError(f"{path}: cannot describe this model ({exc!r})") from None


def genai_config(m: Manifest, model_type: str = "llama") -> dict:
    """onnxruntime-genai's config for one of our folders, so its Generator loads it too."""
    inputs = {"input_ids": io.INPUT_IDS, "attention_mask": io.ATTENTION_MASK,
              "past_key_names": io.PAST_KEY, "past_value_names": io.PAST_VALUE}
    if m.has_position_ids:
        inputs["position_ids"] = io.POSITION_IDS
    return {
        "model": {
            "bos_token_id": m.bos_token_id if m.bos_token_id is not None else 1,
            "context_length": m.context_length,
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": io.GRAPH_NAME,
                "head_size": m.head_dim,
                "hidden_size": m.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": io.LOGITS, "present_key_names": io.PRESENT_KEY,
                            "present_value_names": io.PRESENT_VALUE},
                "num_attention_heads": m.num_heads,
                "num_hidden_layers": m.num_layers,
                "num_key_value_heads": m.num_kv_heads,
            },
            "eos_token_id": m.eos_token_ids if len(m.eos_token_ids) != 1 else m.eos_token_ids[0],
            "pad_token_id": m.eos_token_ids[0] if m.eos_token_ids else 0,
            "type": model_type,
            "vocab_size": m.vocab_size,
        },
        "search": {
            "diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
            "max_length": m.context_length, "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
            "num_return_sequences": 1, "past_present_share_buffer": m.kv_layout is KVLayout.SHARED,
            "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0,
        },
    }
