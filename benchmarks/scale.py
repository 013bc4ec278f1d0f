#!/usr/bin/env python3
"""edgellama at 1B scale: a random-weight Llama-3.2-1B-shaped model, edgellama against
onnxruntime-genai and llama.cpp, and against this machine's memory bandwidth.

    HF_HUB_OFFLINE=1 python benchmarks/scale.py                    # full run (~1 h on 2 cores)
    HF_HUB_OFFLINE=1 python benchmarks/scale.py --layers 2 --vocab 8192 --work /tmp/s   # smoke run
    python benchmarks/scale.py --steps report                       # redraw SCALE.md from scale.json

Steps (--steps, default all, in this order):

make       WORK/hf/: a Llama-3.2-1B-shaped Hugging Face folder with random weights (hidden 2048,
           16 layers, 32 heads / 8 KV heads, head_dim 64, FFN 8192, vocab 128,256, tied
           embeddings, rope_theta 500000 with llama3 rope_scaling), bf16 safetensors, normal
           std 0.02 (norm weights 1 +- 0.02), seeded; a byte-level BPE tokenizer.json (merges
           trained on the GPL-3 text, the rest of the vocabulary filler tokens, Llama 3's
           special tokens at 128000+). WORK/model-f16.gguf: the same weights (q/k rows permuted
           as llama.cpp's convert_hf_to_gguf does, rope_freqs for the llama3 scaling), written
           with gguf-py; then llama.cpp's llama_model_quantize (llama-cpp-python in
           PEERS/llamacpp) makes WORK/model-q4_0.gguf and WORK/model-q4_k_m.gguf. Kept when
           present (--remake rebuilds). The shape options (--layers, --hidden, --vocab ...)
           make a smaller model for a quick run; use a separate --work for it.
build      GNU time -v (wall s, peak RSS) of: edgellama export HF fp32 and --bits 4, export
           of the Q4_0 and Q4_K_M GGUFs with --bits 4, edgellama quantize on the fp32 export
           (its defaults), and onnxruntime-genai's builder `-p int4 -e cpu` on the HF folder
           (in edgellama's venv, where onnxruntime-genai is installed).
bandwidth  a streaming-read probe: numpy sum over a --bw-gib float32 array, 1 thread and 2
           threads (each summing half), --bw-passes passes, the best pass (GB/s). Run before
           and after the speed step; the report uses the higher of the two.
speed      decode and prefill for every int4 system: --rounds interleaved rounds (order
           reversed every other round), a fresh process per system per round (this script's
           `peer` mode, driving benchmarks/peers/decode_peer.py's runners: the same code path
           as compare.py), 2 threads. Decode: --new-tokens greedy tokens after the 9-token
           prompt, first new token to last (prefill excluded). Prefill: one forward over the
           first --prefill tokens of peers/prefill_512.json. One warm-up of each first, then
           --runs each, median; medians over rounds in the report.
report     SCALE.md and scale.json in --results.

The bandwidth limit of a system: weight bytes it reads per decoded token (every weight
initializer / GGUF tensor except an embedding table that is only gathered from) over the
2-thread bandwidth, as tok/s; each system's decode is given as a percentage of its own limit.

Paths: --work (default benchmarks/work/scale, git-ignored: several GB, never commit it),
--peers (default benchmarks/work/peers), --python (edgellama's interpreter), --results.
Targets (issue 18): decode >= 1.0x the faster of genai int4 and llama.cpp Q4_0 and >= 60 %
of the bandwidth limit; export peak RSS <= 0.5x the bf16 checkpoint; quantize peak RSS
<= 1.5x the float folder.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
THREADS = 2
STEPS = ["make", "build", "bandwidth", "speed", "report"]
PROMPT_TEXT = Path(REPO.parent, "shared", "data", "GPL-3.txt")

# label -> (family, description)
SYSTEMS = {
    "el-int4": ("edgellama", "edgellama export HF --bits 4 (block 32, mse, weight-only)"),
    "el-quant": ("edgellama", "edgellama quantize on the fp32 export (its defaults)"),
    "el-q4_0": ("edgellama", "edgellama export model-q4_0.gguf --bits 4 (Q4_0 blocks carried over)"),
    "el-q4_k_m": ("edgellama", "edgellama export model-q4_k_m.gguf --bits 4"),
    "genai-int4": ("genai", "onnxruntime-genai builder -p int4 -e cpu on the HF folder"),
    "llamacpp-q4_0": ("llama.cpp", "llama.cpp on model-q4_0.gguf"),
    "llamacpp-q4_k_m": ("llama.cpp", "llama.cpp on model-q4_k_m.gguf"),
}
BUILDS = ["el-fp32", "el-int4", "el-q4_0", "el-q4_k_m", "genai-int4", "el-quant"]
BUILD_DESC = {
    "el-fp32": "edgellama export HF (fp32)",
    "el-int4": "edgellama export HF --bits 4",
    "el-q4_0": "edgellama export Q4_0 GGUF --bits 4",
    "el-q4_k_m": "edgellama export Q4_K_M GGUF --bits 4",
    "el-quant": "edgellama quantize el-fp32 (defaults)",
    "genai-int4": "onnxruntime-genai builder -p int4 -e cpu",
}

# Llama 3's special tokens (the rest of the 256 are reserved ones)
LLAMA3_SPECIAL = {0: "<|begin_of_text|>", 1: "<|end_of_text|>", 4: "<|finetune_right_pad_id|>",
                  6: "<|start_header_id|>", 7: "<|end_header_id|>", 8: "<|eom_id|>", 9: "<|eot_id|>",
                  10: "<|python_tag|>"}
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
                 "{{ m['content'] }}<|eot_id|>{% endfor %}{% if add_generation_prompt %}"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def env() -> dict:
    e = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    e.setdefault("CPULOAD_MAX_WAIT_S", "10")  # the machine is shared: wait a little for quiet, then record
    return e


# ----------------------------------------------------------------------------- the model

def shape_of(a: argparse.Namespace) -> dict:
    return {"hidden": a.hidden, "layers": a.layers, "heads": a.heads, "kv_heads": a.kv_heads,
            "head_dim": a.head_dim, "ffn": a.ffn, "vocab": a.vocab}


def hf_config(s: dict) -> dict:
    n_special = min(256, s["vocab"] // 16)
    bos = s["vocab"] - n_special
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": s["hidden"], "intermediate_size": s["ffn"], "num_hidden_layers": s["layers"],
        "num_attention_heads": s["heads"], "num_key_value_heads": s["kv_heads"], "head_dim": s["head_dim"],
        "vocab_size": s["vocab"], "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                         "original_max_position_embeddings": 8192, "rope_type": "llama3"},
        "tie_word_embeddings": True, "torch_dtype": "bfloat16", "hidden_act": "silu",
        "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False, "pretraining_tp": 1,
        "initializer_range": 0.02, "use_cache": True,
        "bos_token_id": bos, "eos_token_id": [bos + 1, bos + 8, bos + 9],
    }


def tensor_list(s: dict) -> list[tuple[str, tuple[int, ...]]]:
    """HF names and shapes (torch order: out, in) of a tied Llama."""
    h, q, kv, f = s["hidden"], s["heads"] * s["head_dim"], s["kv_heads"] * s["head_dim"], s["ffn"]
    out = [("model.embed_tokens.weight", (s["vocab"], h))]
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,)),
                (p + "self_attn.q_proj.weight", (q, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, q)),
                (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.up_proj.weight", (f, h)),
                (p + "mlp.down_proj.weight", (h, f))]
    out.append(("model.norm.weight", (h,)))
    return out


def to_bf16(x):
    """float32 -> bfloat16 bits (uint16), round to nearest even."""
    import numpy as np
    u = x.astype(np.float32, copy=False).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def random_tensor(seed: int, idx: int, name: str, shape: tuple[int, ...], chunk_rows: int = 8192):
    """bf16 bits of one tensor, generated in row chunks (the embedding is 0.5 GB in bf16)."""
    import numpy as np
    rng = np.random.default_rng([seed, idx])
    if len(shape) == 1:  # norms: around 1, perturbed so that they are really applied
        return to_bf16(1.0 + 0.02 * rng.standard_normal(shape, dtype=np.float32))
    out = np.empty(shape, dtype=np.uint16)
    for r in range(0, shape[0], chunk_rows):
        n = min(chunk_rows, shape[0] - r)
        out[r:r + n] = to_bf16(rng.standard_normal((n, shape[1]), dtype=np.float32) * np.float32(0.02))
    return out


def write_safetensors(path: Path, s: dict, seed: int) -> None:
    tensors = tensor_list(s)
    header, off = {}, 0
    for name, shape in tensors:
        n = 2 * math.prod(shape)
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    header["__metadata__"] = {"format": "pt"}
    hb = json.dumps(header, separators=(",", ":")).encode()
    hb += b" " * (-len(hb) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(hb).to_bytes(8, "little"))
        f.write(hb)
        for idx, (name, shape) in enumerate(tensors):
            random_tensor(seed, idx, name, shape).tofile(f)
    tmp.replace(path)


def read_safetensors(path: Path):
    """name -> uint16 memmap (bf16 bits), shape in torch order."""
    import numpy as np
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    base = 8 + n
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        a, b = info["data_offsets"]
        out[name] = np.memmap(path, dtype=np.uint16, mode="r", offset=base + a, shape=tuple(info["shape"]))
        assert out[name].nbytes == b - a
    return out


def build_tokenizer(folder: Path, s: dict) -> dict:
    """A byte-level BPE of vocab_size - n_special model tokens + Llama 3's special tokens.

    Merges are trained on the GPL-3 text (a few thousand); the rest of the model vocabulary is
    filler tokens no merge produces (so the id space is the real model's). Returns the pieces the
    GGUF needs: tokens (by id), token types and merges."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    n_special = min(256, s["vocab"] // 16)
    base = s["vocab"] - n_special
    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    text = PROMPT_TEXT.read_text(encoding="utf-8") if PROMPT_TEXT.exists() else (__doc__ or "") * 20
    trainer = trainers.BpeTrainer(vocab_size=min(4000, base), min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer)
    d = json.loads(tok.to_str())
    vocab: dict[str, int] = d["model"]["vocab"]
    i = 0
    while len(vocab) < base:
        name = f"<unused{i}>"
        if name not in vocab:
            vocab[name] = len(vocab)
        i += 1
    specials = [LLAMA3_SPECIAL.get(j, f"<|reserved_special_token_{j}|>") for j in range(n_special)]
    d["added_tokens"] = [{"id": base + j, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for j, t in enumerate(specials)]
    bos, eos = specials[0], specials[9] if n_special > 9 else specials[1]
    d["post_processor"] = {"type": "TemplateProcessing",
                           "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                                    {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {bos: {"id": bos, "ids": [base], "tokens": [bos]}}}
    js = json.dumps(d, ensure_ascii=False)
    check = Tokenizer.from_str(js)  # valid?
    assert check.get_vocab_size() == s["vocab"], check.get_vocab_size()
    (folder / "tokenizer.json").write_text(js, encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": eos,
        "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": True,
        "model_max_length": 131072, "chat_template": CHAT_TEMPLATE}, indent=1))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": bos, "eos_token": eos}))
    tokens = [None] * s["vocab"]
    for t, i in vocab.items():
        tokens[i] = t
    for j, t in enumerate(specials):
        tokens[base + j] = t
    merges = [m if isinstance(m, str) else " ".join(m) for m in d["model"]["merges"]]
    return {"tokens": tokens, "types": [1] * base + [3] * n_special, "merges": merges,
            "bos": base, "eos": base + (9 if n_special > 9 else 1)}


def llama_permute(w, n_head: int):
    """convert_hf_to_gguf's LlamaModel.permute: HF's rotate-half rows -> llama.cpp's pairs."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def llama3_rope_factors(cfg: dict):
    """rope_freqs.weight as convert_hf_to_gguf writes it for rope_type llama3."""
    import numpy as np
    rs, dim, base = cfg["rope_scaling"], cfg["head_dim"], cfg["rope_theta"]
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, lo, hi = rs["factor"], rs["low_freq_factor"], rs["high_freq_factor"]
    old = rs["original_max_position_embeddings"]
    lo_wl, hi_wl = old / lo, old / hi
    out = []
    for f in freqs:
        wl = 2 * math.pi / f
        if wl < hi_wl:
            out.append(1.0)
        elif wl > lo_wl:
            out.append(factor)
        else:
            smooth = (old / wl - lo) / (hi - lo)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


GGUF_NAMES = {"input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
              "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf == "model.norm.weight":
        return "output_norm.weight"
    _, _, i, rest = hf.split(".", 3)
    return f"blk.{i}.{GGUF_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(path: Path, hf_dir: Path, cfg: dict, tok: dict) -> None:
    """The HF folder's bf16 weights as an F16 (matrices) / F32 (norms) GGUF, arch llama."""
    import gguf
    import numpy as np
    st = read_safetensors(hf_dir / "model.safetensors")
    w = gguf.GGUFWriter(str(path) + ".tmp", "llama")
    w.add_name("random-llama-3.2-1b-shape")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_rope_dimension_count(cfg["head_dim"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_vocab_size(cfg["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(True)
    w.add_chat_template(CHAT_TEMPLATE)

    def converted(name):
        a = st[name]
        f32 = (a.astype(np.uint32) << 16).view(np.float32)
        if a.ndim == 1:
            return f32
        if ".q_proj." in name:
            f32 = llama_permute(f32, cfg["num_attention_heads"])
        elif ".k_proj." in name:
            f32 = llama_permute(f32, cfg["num_key_value_heads"])
        return f32.astype(np.float16)

    order = list(st)
    rope = llama3_rope_factors(cfg)
    w.add_tensor_info("rope_freqs.weight", rope.shape, rope.dtype, rope.nbytes)
    for name in order:
        a = st[name]
        dt = np.dtype(np.float32 if a.ndim == 1 else np.float16)
        w.add_tensor_info(gguf_name(name), a.shape, dt, a.size * dt.itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.write_tensor_data(rope)
    for name in order:
        w.write_tensor_data(converted(name))
    w.close()
    os.replace(str(path) + ".tmp", path)


LLAMACPP_QUANTIZE = r"""
import ctypes, sys, llama_cpp
src, dst, ftype, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
p = llama_cpp.llama_model_quantize_default_params()
p.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
p.nthread = threads
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(p))
sys.exit(rc)
"""


def make(a: argparse.Namespace, doc: dict) -> None:
    s = shape_of(a)
    hf = a.work / "hf"
    cfg = hf_config(s)
    st = hf / "model.safetensors"
    same = (hf / "config.json").exists() and json.loads((hf / "config.json").read_text()) == cfg
    rec = doc.setdefault("make", {})
    if a.remake or not same or not st.exists():
        hf.mkdir(parents=True, exist_ok=True)
        for f in hf.iterdir():
            f.unlink()
        t = time.perf_counter()
        (hf / "config.json").write_text(json.dumps(cfg, indent=1))
        (hf / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False}))
        tok = build_tokenizer(hf, s)
        (a.work / "gguf_vocab.json").write_text(json.dumps(tok))
        write_safetensors(st, s, a.seed)
        rec["hf_s"] = round(time.perf_counter() - t, 1)
        log(f"made {hf} ({st.stat().st_size / 1e9:.2f} GB) in {rec['hf_s']} s")
        for f in ("model-f16.gguf", "model-q4_0.gguf", "model-q4_k_m.gguf"):
            (a.work / f).unlink(missing_ok=True)
    tok = json.loads((a.work / "gguf_vocab.json").read_text())
    f16 = a.work / "model-f16.gguf"
    if not f16.exists():
        t = time.perf_counter()
        write_gguf(f16, hf, cfg, tok)
        rec["gguf_f16_s"] = round(time.perf_counter() - t, 1)
        log(f"wrote {f16} ({f16.stat().st_size / 1e9:.2f} GB) in {rec['gguf_f16_s']} s")
    for ft in ("Q4_0", "Q4_K_M"):
        out = a.work / f"model-{ft.lower()}.gguf"
        if out.exists():
            continue
        t = time.perf_counter()
        p = subprocess.run([llamacpp_python(a), "-c", LLAMACPP_QUANTIZE, str(f16), str(out) + ".tmp", ft, str(THREADS)],
                           capture_output=True, text=True, env=env())
        if p.returncode != 0:
            raise SystemExit(f"llama_model_quantize {ft} failed (exit {p.returncode}):\n{p.stderr[-3000:]}")
        os.replace(str(out) + ".tmp", out)
        rec[f"quantize_{ft.lower()}_s"] = round(time.perf_counter() - t, 1)
        log(f"llama.cpp quantize {ft}: {out.stat().st_size / 1e9:.3f} GB in {rec[f'quantize_{ft.lower()}_s']} s")
    rec.update({"shape": s, "seed": a.seed, "hf_config": cfg,
                "checkpoint_bf16_mb": round(st.stat().st_size / 1e6, 1),
                "gguf_mb": {f: round((a.work / f"model-{f}.gguf").stat().st_size / 1e6, 1)
                            for f in ("f16", "q4_0", "q4_k_m")},
                "params": sum(math.prod(sh) for _, sh in tensor_list(s))})


# ----------------------------------------------------------------------------- build (export / quantize)

def llamacpp_python(a) -> str:
    return str(a.peers / "llamacpp" / "bin" / "python")


def folder(a, label: str) -> Path:
    return a.work / "exports" / label


def build_commands(a) -> dict[str, list[str]]:
    el = [a.python, "-m", "edgellama.cli"]
    hf, w = str(a.work / "hf"), lambda x: str(folder(a, x))  # noqa: E731
    return {
        "el-fp32": [*el, "export", hf, w("el-fp32")],
        "el-int4": [*el, "export", hf, w("el-int4"), "--bits", "4"],
        "el-q4_0": [*el, "export", str(a.work / "model-q4_0.gguf"), w("el-q4_0"), "--bits", "4"],
        "el-q4_k_m": [*el, "export", str(a.work / "model-q4_k_m.gguf"), w("el-q4_k_m"), "--bits", "4"],
        "el-quant": [*el, "quantize", w("el-fp32"), w("el-quant")],
        "genai-int4": [a.python, "-m", "onnxruntime_genai.models.builder", "-i", hf, "-o", w("genai-int4"),
                       "-p", "int4", "-e", "cpu", "-c", str(a.work / "genai_cache")],
    }


def run_builds(a, doc: dict) -> None:
    from compare import parse_time_v
    from compare import dir_size_mb
    from layout import genai_builder_env
    from peers.cpuload import ForeignLoad, wait_quiet
    cmds = build_commands(a)
    (a.work / "logs").mkdir(parents=True, exist_ok=True)
    sec = doc.setdefault("build", {})
    for label in [x for x in BUILDS if x in a.builds]:
        runs = []
        for r in range(a.build_repeats):
            import shutil
            shutil.rmtree(folder(a, label), ignore_errors=True)
            shutil.rmtree(a.work / "genai_cache", ignore_errors=True)
            folder(a, label).parent.mkdir(parents=True, exist_ok=True)
            log(f"build {label} ({r + 1}/{a.build_repeats}): {' '.join(cmds[label])}")
            logfile = a.work / "logs" / f"build-{label}.log"
            wait_quiet(log=log, max_wait_s=float(env()["CPULOAD_MAX_WAIT_S"]))
            e = genai_builder_env(env(), a.peers) if label.startswith("genai") else env()
            try:
                with open(logfile, "w") as lf, ForeignLoad() as fl:
                    p = subprocess.run(["/usr/bin/time", "-v", *cmds[label]], stdout=lf, stderr=subprocess.STDOUT,
                                       env=e, cwd=str(a.work), timeout=a.build_timeout)
                rc = p.returncode
            except subprocess.TimeoutExpired:
                rc = f"timed out after {a.build_timeout} s"
            text = logfile.read_text(errors="replace") + ("" if isinstance(rc, int) else f"\n{rc}")
            if rc != 0:
                sec[label] = {"command": " ".join(cmds[label]), "error": text[-2000:]}
                log(f"FAILED {label}: {text[-1500:]}")
                break
            m = parse_time_v(text)
            m["out_mb"] = round(dir_size_mb(folder(a, label)), 1)
            m["foreign_cpus"] = round(fl.cpus, 3)
            runs.append(m)
            log(f"  {label}: {m['wall_s']:.1f} s, peak RSS {m['peak_rss_mb']:.0f} MB, out {m['out_mb']} MB, "
                f"foreign {m['foreign_cpus']}")
        else:
            sec[label] = {"command": " ".join(cmds[label]),
                          "wall_s": round(statistics.median(x["wall_s"] for x in runs), 2),
                          "peak_rss_mb": round(statistics.median(x["peak_rss_mb"] for x in runs), 1),
                          "out_mb": runs[-1]["out_mb"], "runs": runs}
        save(a, doc)


# ----------------------------------------------------------------------------- bandwidth

BANDWIDTH = r"""
import json, sys, time
from concurrent.futures import ThreadPoolExecutor
import numpy as np
gib, passes = float(sys.argv[1]), int(sys.argv[2])
a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)   # pages touched
half = [a[: a.size // 2], a[a.size // 2:]]
out = {"bytes": a.nbytes}
for threads in (1, 2):
    rates = []
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(passes):
            t = time.perf_counter()
            if threads == 1:
                a.sum()
            else:
                list(pool.map(np.sum, half))       # numpy releases the GIL in the reduction
            rates.append(a.nbytes / (time.perf_counter() - t) / 1e9)
    out[f"gb_s_{threads}t"] = round(max(rates), 2)
    out[f"gb_s_{threads}t_median"] = round(sorted(rates)[len(rates) // 2], 2)
    out[f"passes_{threads}t"] = [round(x, 2) for x in rates]
print(json.dumps(out))
"""


def bandwidth(a, doc: dict, when: str) -> None:
    from peers.cpuload import ForeignLoad, wait_quiet
    wait_quiet(log=log, max_wait_s=float(env()["CPULOAD_MAX_WAIT_S"]))
    with ForeignLoad() as fl:
        p = subprocess.run([a.python, "-c", BANDWIDTH, str(a.bw_gib), str(a.bw_passes)], capture_output=True,
                           text=True, env=env())
    if p.returncode != 0:
        log(f"bandwidth probe failed: {p.stderr[-1000:]}")
        return
    r = json.loads(p.stdout)
    r["foreign_cpus"] = round(fl.cpus, 3)
    doc.setdefault("bandwidth", {})[when] = r
    log(f"bandwidth ({when}): {r['gb_s_1t']} GB/s 1 thread, {r['gb_s_2t']} GB/s 2 threads (foreign {r['foreign_cpus']})")
    save(a, doc)


# ----------------------------------------------------------------------------- speed

def model_path(a, label: str) -> str:
    if label.startswith("llamacpp-"):
        return str(a.work / f"model-{label.removeprefix('llamacpp-')}.gguf")
    return str(folder(a, label))


def peer_cmd(a, label: str) -> list[str]:
    fam = SYSTEMS[label][0]
    py, system = {"edgellama": (a.python, "edgellama"), "genai": (a.python, "genai"),
                  "llama.cpp": (llamacpp_python(a), "llamacpp")}[fam]
    return [py, str(Path(__file__).resolve()), "peer", "--system", system, "--model", model_path(a, label),
            "--threads", str(THREADS), "--new-tokens", str(a.new_tokens), "--prefill", str(a.prefill),
            "--runs", str(a.runs), "--vocab", str(a.vocab - min(256, a.vocab // 16))]


def run_speed(a, doc: dict) -> None:
    labels = [x for x in SYSTEMS if x in a.systems and os.path.exists(model_path(a, x))]
    missing = [x for x in a.systems if x not in labels]
    if missing:
        log(f"speed: skipping {missing} (no model; run the build step)")
    sec = doc.setdefault("speed", {})
    got: dict[str, list[dict]] = {x: [] for x in labels}
    for r in range(a.rounds):
        for label in labels if r % 2 == 0 else labels[::-1]:
            if got[label] and "error" in got[label][-1]:
                continue
            log(f"speed: {label} (round {r + 1}/{a.rounds})")
            p = subprocess.run(peer_cmd(a, label), capture_output=True, text=True, env=env())
            (a.work / "logs").mkdir(parents=True, exist_ok=True)
            (a.work / "logs" / f"speed-{label}-r{r}.err").write_text(p.stderr)
            if p.returncode != 0:
                got[label].append({"error": p.stderr[-2000:]})
                sec[label] = {"error": p.stderr[-2000:]}
                log(f"FAILED {label}: {p.stderr[-1500:]}")
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            got[label].append(res)
            log(f"  decode {res['decode_tok_s']} tok/s, prefill-{a.prefill} {res['prefill_tok_s']} tok/s, "
                f"peak RSS {res['peak_rss_mb']:.0f} MB, foreign {res['foreign_cpus']}")
            rounds = got[label]
            med = lambda k: round(statistics.median(x[k] for x in rounds), 2)  # noqa: E731
            sec[label] = {"decode_tok_s": med("decode_tok_s"), "prefill_tok_s": med("prefill_tok_s"),
                          "load_s": med("load_s"), "peak_rss_mb": med("peak_rss_mb"),
                          "first_ids": rounds[0]["first_ids"], "versions": rounds[0]["versions"],
                          "rounds": [{k: x[k] for k in ("decode_tok_s", "prefill_tok_s", "foreign_cpus", "runs")}
                                     for x in rounds]}
            save(a, doc)
    # per-round ratios to the fastest peer in that round
    doc["settings"] = {"rounds": a.rounds, "runs": a.runs, "new_tokens": a.new_tokens, "prefill": a.prefill,
                       "threads": THREADS}
    save(a, doc)


def peer_main(argv: list[str]) -> None:
    """In the system's own interpreter: load, warm up, time decode and prefill; one JSON line."""
    ap = argparse.ArgumentParser(prog="scale.py peer")
    ap.add_argument("--system", required=True)
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=THREADS)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--vocab", type=int, default=128000, help="ids are taken modulo this (a smoke run's small vocab)")
    p = ap.parse_args(argv)
    sys.path.insert(0, str(HERE / "peers"))
    import decode_peer as dp
    from cpuload import ForeignLoad, wait_quiet
    max_wait = float(os.environ.get("CPULOAD_MAX_WAIT_S", "10"))
    t = time.perf_counter()
    runner = dp.RUNNERS[p.system](p.model, p.threads)
    load_s = time.perf_counter() - t
    prompt = [i % p.vocab for i in dp.PROMPT_IDS]
    long = [i % p.vocab for i in dp.load_prefill_ids()[:p.prefill]]
    runner.prefill_and_decode(prompt, 8)       # warm-up
    runner.prefill_and_decode(long, 1)         # warm-up at the prefill shape
    decode, prefill, foreign, ids = [], [], [], None
    for _ in range(p.runs):
        wait_quiet(max_wait_s=max_wait)
        with ForeignLoad() as fl:
            toks, t0, t1, t2 = runner.prefill_and_decode(prompt, p.new_tokens)
        decode.append((len(toks) - 1) / (t2 - t1))
        ids = ids or toks
        wait_quiet(max_wait_s=max_wait)
        with ForeignLoad() as fl2:
            _, t0, t1, _ = runner.prefill_and_decode(long, 1)
        prefill.append(len(long) / (t1 - t0))
        foreign += [round(fl.cpus, 3), round(fl2.cpus, 3)]
    print(json.dumps({"system": p.system, "model": p.model, "decode_tok_s": round(statistics.median(decode), 3),
                      "prefill_tok_s": round(statistics.median(prefill), 2), "load_s": round(load_s, 3),
                      "peak_rss_mb": round(dp.peak_rss_mb(), 1), "first_ids": ids[:16],
                      "foreign_cpus": max(foreign), "versions": dp.versions(p.system),
                      "runs": {"decode_tok_s": [round(x, 3) for x in decode],
                               "prefill_tok_s": [round(x, 2) for x in prefill], "foreign_cpus": foreign}}))


# ----------------------------------------------------------------------------- bytes per token

ONNX_BYTES = r"""
import json, os, sys
import onnx
d = sys.argv[1]
m = onnx.load(os.path.join(d, "model.onnx"), load_external_data=False)
size = {}
for t in m.graph.initializer:
    ext = {e.key: e.value for e in t.external_data}
    size[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data) or 4 * len(t.float_data)
users = {}
for n in m.graph.node:
    for i, x in enumerate(n.input):
        if x in size:
            users.setdefault(x, []).append((n.op_type, i))
# read only a row at a time: the data / scales / zero points of Gather and GatherBlockQuantized (input 1 = indices)
gathered = [k for k, u in users.items() if all(op.startswith("Gather") and i != 1 for op, i in u)]
total = sum(size.values())
print(json.dumps({"weights_bytes": total, "gather_only_bytes": sum(size[k] for k in gathered),
                  "gather_only": sorted(gathered, key=lambda k: -size[k])[:4],
                  "read_bytes": total - sum(size[k] for k in gathered), "nodes": len(m.graph.node),
                  "ops": {op: sum(1 for n in m.graph.node if n.op_type == op)
                          for op in sorted({n.op_type for n in m.graph.node})}}))
"""

GGUF_BYTES = r"""
import json, sys
from gguf import GGUFReader
r = GGUFReader(sys.argv[1])
size = {t.name: int(t.n_bytes) for t in r.tensors}
types = {}
for t in r.tensors:
    types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + int(t.n_bytes)
tied = "output.weight" not in size
gathered = 0 if tied else size.get("token_embd.weight", 0)
print(json.dumps({"weights_bytes": sum(size.values()), "gather_only_bytes": gathered,
                  "read_bytes": sum(size.values()) - gathered, "tied": tied,
                  "token_embd_type": next(t.tensor_type.name for t in r.tensors if t.name == "token_embd.weight"),
                  "bytes_by_type": types}))
"""


def bytes_per_token(a, doc: dict) -> None:
    sec = doc.setdefault("bytes", {})
    for label in SYSTEMS:
        path = model_path(a, label)
        if not os.path.exists(path):
            continue
        code = GGUF_BYTES if label.startswith("llamacpp-") else ONNX_BYTES
        p = subprocess.run([a.python, "-c", code, path], capture_output=True, text=True, env=env())
        if p.returncode != 0:
            log(f"bytes per token of {label} failed: {p.stderr[-800:]}")
            continue
        sec[label] = json.loads(p.stdout)
        sec[label]["size_mb"] = round((os.path.getsize(path) if os.path.isfile(path) else
                                       sum(f.stat().st_size for f in Path(path).iterdir() if f.is_file())) / 1e6, 1)
    save(a, doc)


# ----------------------------------------------------------------------------- report

def save(a, doc: dict) -> None:
    a.results.mkdir(parents=True, exist_ok=True)
    tmp = a.results / f"{a.name}.json.tmp"
    tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False))
    tmp.replace(a.results / f"{a.name}.json")


def fmt(x, nd=1, dash="—"):
    return dash if x is None else f"{x:,.{nd}f}"


def report(doc: dict) -> str:
    import host
    mk = doc.get("make", {})
    s = mk.get("shape", {})
    st = doc.get("settings", {})
    L = [f"# edgellama at 1B scale — random-weight Llama-3.2-1B shape, CPU, {THREADS} threads", "",
         f"Written by `benchmarks/scale.py` from [{doc.get('name', 'scale')}.json]({doc.get('name', 'scale')}.json); "
         "`python benchmarks/scale.py --help` gives the method. A later run replaces this file.", "",
         f"Machine: {host.describe(doc.get('machine', {}))}. Measured {doc.get('measured_at', '?')}. "
         "Medians; `foreign` = CPUs used by other processes during the timed runs (this machine was shared "
         "with other jobs: see Notes).", ""]
    if s:
        L += [f"Model: hidden {s['hidden']}, {s['layers']} layers, {s['heads']} heads / {s['kv_heads']} KV heads, "
              f"head_dim {s['head_dim']}, FFN {s['ffn']}, vocab {s['vocab']:,}, tied embeddings, llama3 rope; "
              f"{mk.get('params', 0) / 1e9:.3f} B parameters, random normal weights (std 0.02, seed {mk.get('seed')}); "
              f"bf16 checkpoint {fmt(mk.get('checkpoint_bf16_mb'), 0)} MB; GGUF F16 {fmt(mk.get('gguf_mb', {}).get('f16'), 0)} MB, "
              f"Q4_0 {fmt(mk.get('gguf_mb', {}).get('q4_0'), 0)} MB, Q4_K_M {fmt(mk.get('gguf_mb', {}).get('q4_k_m'), 0)} MB "
              "(llama.cpp's llama_model_quantize).", ""]
    vers = doc.get("versions", {})
    if vers:
        L += ["Versions: " + "; ".join(f"{k}: " + ", ".join(f"{n} {v}" for n, v in vs.items()) for k, vs in vers.items()), ""]

    bw = doc.get("bandwidth", {})
    bw2 = max((r["gb_s_2t"] for r in bw.values()), default=None)
    bw1 = max((r["gb_s_1t"] for r in bw.values()), default=None)
    if bw:
        L += [f"Memory bandwidth (numpy sum over a {next(iter(bw.values()))['bytes'] / 2**30:.1f} GiB float32 array, "
              f"best pass): {fmt(bw1)} GB/s with 1 thread, **{fmt(bw2)} GB/s with 2 threads** (the limit below); "
              + ", ".join(f"{k}: {r['gb_s_1t']} / {r['gb_s_2t']} GB/s (foreign {r['foreign_cpus']})" for k, r in bw.items())
              + ".", ""]

    b = doc.get("build", {})
    ckpt = mk.get("checkpoint_bf16_mb")
    fp32 = b.get("el-fp32", {}).get("out_mb")
    if b:
        L += ["## Export and quantize", "",
              "GNU `time -v`, one process each; the ratios are peak RSS over the bf16 checkpoint "
              f"({fmt(ckpt, 0)} MB) and, for quantize, over its input, the fp32 folder ({fmt(fp32, 0)} MB).", "",
              "| step | wall s | peak RSS MB | RSS / bf16 checkpoint | RSS / fp32 folder | output MB | foreign CPUs |",
              "|---|---|---|---|---|---|---|"]
        for label in BUILDS:
            r = b.get(label)
            if r is None:
                continue
            if "error" in r:
                L.append(f"| {label}: {BUILD_DESC[label]} | FAILED | | | | | |")
                continue
            L.append(f"| {label}: {BUILD_DESC[label]} | {fmt(r['wall_s'])} | {fmt(r['peak_rss_mb'], 0)} "
                     f"| {fmt(ckpt and r['peak_rss_mb'] / ckpt, 2)}x | {fmt(fp32 and r['peak_rss_mb'] / fp32, 2)}x "
                     f"| {fmt(r['out_mb'], 0)} | {r['runs'][-1].get('foreign_cpus')} |")
        L += [""]

    sp, by = doc.get("speed", {}), doc.get("bytes", {})
    requiet(sp)
    if sp:
        def best(fams, key):
            c = [(k, v[key]) for k, v in sp.items() if SYSTEMS[k][0] in fams and "error" not in v]
            return max(c, key=lambda x: x[1]) if c else (None, None)
        ref_label, ref_dec = best_reference(sp)
        pl, pp = best(("genai", "llama.cpp"), "prefill_tok_s")
        L += ["## Decode and prefill", "",
              f"Decode: {st.get('new_tokens')} greedy tokens after a 9-token prompt, prefill excluded; prefill: one "
              f"forward over {st.get('prefill')} tokens. {max(len(v.get('rounds', [])) for v in sp.values())} interleaved rounds (order reversed every "
              f"other round, a fresh process per system per round), {st.get('runs')} runs each after a warm-up; "
              f"median over the rounds during which other processes used ≤ {QUIET} CPUs (`quiet`; all rounds where none "
              "was), of the per-process figures. Bytes / token: weight bytes read per decoded token "
              "(all weights except a gather-only embedding table); limit = 2-thread bandwidth / that.", "",
              f"| system | decode tok/s | vs {ref_label or 'ref'} | best round | prefill tok/s | vs {pl or 'best peer'} "
              "| MB read / token | limit tok/s | % of limit (best round) | size MB | graph nodes | peak RSS MB | load s "
              "| quiet rounds |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for label in SYSTEMS:
            r = sp.get(label)
            if r is None:
                continue
            if "error" in r:
                L.append(f"| {label} | FAILED | | | | | | | | | | | | |")
                continue
            rb = by.get(label, {})
            mb = rb.get("read_bytes", 0) / 1e6 or None
            lim = bw2 * 1e3 / mb if bw2 and mb else None
            top = max(x["decode_tok_s"] for x in r["rounds"])
            L.append(f"| {label} | {fmt(r['decode_tok_s'], 2)} | {fmt(ref_dec and r['decode_tok_s'] / ref_dec, 2)}x "
                     f"| {fmt(top, 2)} | {fmt(r['prefill_tok_s'], 1)} | {fmt(pp and r['prefill_tok_s'] / pp, 2)}x | {fmt(mb, 0)} "
                     f"| {fmt(lim, 1)} | {fmt(lim and 100 * r['decode_tok_s'] / lim, 0)} % "
                     f"({fmt(lim and 100 * top / lim, 0)} %) | {fmt(rb.get('size_mb'), 0)} "
                     f"| {rb.get('nodes', '—')} | {fmt(r['peak_rss_mb'], 0)} | {fmt(r['load_s'], 2)} "
                     f"| {r.get('n_quiet')} of {len(r['rounds'])} |")
        L += ["", "`best round`: the highest of the per-round figures (other processes only slow a run down, so on a "
              "shared machine it is the figure least touched by them).", ""]
        L += ["Per round, decode tok/s (foreign CPUs): " + "; ".join(
            f"{k} " + ", ".join(f"{fmt(x['decode_tok_s'], 2)} ({x['foreign_cpus']:.2f})" for x in v["rounds"])
            for k, v in sp.items() if "rounds" in v), ""]
        firsts = {k: v["first_ids"] for k, v in sp.items() if "first_ids" in v}
        pairs = [("el-q4_0", "llamacpp-q4_0"), ("el-q4_k_m", "llamacpp-q4_k_m"), ("el-int4", "genai-int4")]
        agree = []
        for x, y in pairs:
            if x in firsts and y in firsts:
                n = next((i for i, (p, q) in enumerate(zip(firsts[x], firsts[y])) if p != q), len(firsts[x]))
                agree.append(f"{x} / {y}: {n} of {len(firsts[x])}")
        if agree:
            L += ["Greedy agreement (leading tokens equal, random weights make near-ties common): "
                  + "; ".join(agree) + ".", ""]

    t = targets(doc)
    if t:
        L += ["## Targets (issue 18, 1B shape)", "", "| target | measured | holds |", "|---|---|---|"]
        L += [f"| {x['target']} | {x['measured']} | {'yes' if x['holds'] else 'no'} |" for x in t]
        L += [""]
    L += ["Systems: " + "; ".join(f"`{k}` = {v[1]}" for k, v in SYSTEMS.items() if k in sp or k in b), ""]
    if doc.get("notes"):
        L += ["## Notes", ""] + [f"- {n}" for n in doc["notes"]] + [""]
    if doc.get("commands"):
        L += ["Runs merged into this file: " + "; ".join(f"`{c}`" for c in doc["commands"]), ""]
    if doc.get("pooled_from"):
        L += ["Speed rounds pooled with those of: " + "; ".join(f"`{c}`" for c in doc["pooled_from"]), ""]
    return "\n".join(L).rstrip() + "\n"


QUIET = 0.25  # rounds during which other processes used more CPUs are left out of the medians (decode_peer's rule)


def quiet(rounds: list[dict]) -> list[dict]:
    """The rounds run on a quiet machine; all of them when none was."""
    q = [x for x in rounds if x["foreign_cpus"] <= QUIET]
    return q or rounds


def requiet(sp: dict) -> None:
    """decode / prefill medians over the quiet rounds only; n_quiet recorded."""
    for r in sp.values():
        if "rounds" in r:
            q = quiet(r["rounds"])
            r["n_quiet"] = sum(1 for x in r["rounds"] if x["foreign_cpus"] <= QUIET)
            for k in ("decode_tok_s", "prefill_tok_s"):
                r[k] = round(statistics.median(x[k] for x in q), 2)


def best_reference(sp: dict):
    """The faster of genai int4 and llama.cpp Q4_0 (the issue's decode reference)."""
    c = [(k, sp[k]["decode_tok_s"]) for k in ("genai-int4", "llamacpp-q4_0") if k in sp and "error" not in sp[k]]
    return max(c, key=lambda x: x[1]) if c else (None, None)


def pool_rounds(doc: dict, earlier: dict) -> None:
    """Put an earlier run's speed rounds (another NAME.json of the same models) before this one's;
    medians over all of them. Rounds line up by index when every system ran in both runs."""
    for label, old in earlier.get("speed", {}).items():
        new = doc.setdefault("speed", {}).get(label)
        if "rounds" not in old or not new or "rounds" not in new:
            continue
        new["rounds"] = old["rounds"] + new["rounds"]
        for k in ("decode_tok_s", "prefill_tok_s"):
            new[k] = round(statistics.median(x[k] for x in new["rounds"]), 2)
    doc.setdefault("pooled_from", []).append(earlier.get("commands", ["?"])[-1])


def per_round_ratio(sp: dict, label: str) -> list[float]:
    """label's decode over the faster reference in the same round (rounds line up by index)."""
    refs = [sp[k]["rounds"] for k in ("genai-int4", "llamacpp-q4_0") if k in sp and "rounds" in sp[k]]
    mine = sp.get(label, {}).get("rounds", [])
    out = []
    for i, r in enumerate(mine):
        pair = [x[i] for x in refs if i < len(x)]
        if r["foreign_cpus"] > QUIET or any(x["foreign_cpus"] > QUIET for x in pair):
            continue  # only rounds where this system and both references ran on a quiet machine
        best = max((x["decode_tok_s"] for x in pair), default=None)
        if best:
            out.append(r["decode_tok_s"] / best)
    return out


def targets(doc: dict) -> list[dict]:
    out = []
    sp, by, b, mk = doc.get("speed", {}), doc.get("bytes", {}), doc.get("build", {}), doc.get("make", {})
    bw2 = max((r["gb_s_2t"] for r in doc.get("bandwidth", {}).values()), default=None)
    ref_label, ref = best_reference(sp)
    for label in ("el-int4", "el-quant", "el-q4_0", "el-q4_k_m"):
        r = sp.get(label)
        if not r or "error" in r:
            continue
        if ref:
            x = r["decode_tok_s"] / ref
            per = per_round_ratio(sp, label)
            out.append({"target": f"{label} decode ≥ 1.0x the faster of genai int4 and llama.cpp Q4_0 ({ref_label})",
                        "measured": f"{r['decode_tok_s']:.2f} vs {ref:.2f} tok/s = {x:.2f}x"
                                    + (f" (quiet rounds: {', '.join(f'{v:.2f}' for v in per)})" if per else ""),
                        "holds": x >= 1.0})
        rb = by.get(label, {}).get("read_bytes")
        if bw2 and rb:
            pct = 100 * r["decode_tok_s"] / (bw2 * 1e9 / rb)
            out.append({"target": f"{label} decode ≥ 60 % of its bandwidth limit",
                        "measured": f"{pct:.0f} % of {bw2 * 1e9 / rb:.1f} tok/s ({rb / 1e6:.0f} MB/token at {bw2} GB/s)",
                        "holds": pct >= 60})
    ckpt = mk.get("checkpoint_bf16_mb")
    for label in ("el-fp32", "el-int4"):
        r = b.get(label)
        if ckpt and r and "error" not in r:
            x = r["peak_rss_mb"] / ckpt
            out.append({"target": f"{label} ({BUILD_DESC[label]}) peak RSS ≤ 0.5x the bf16 checkpoint",
                        "measured": f"{r['peak_rss_mb']:.0f} MB = {x:.2f}x of {ckpt:.0f} MB", "holds": x <= 0.5})
    q, f = b.get("el-quant"), b.get("el-fp32", {}).get("out_mb")
    if q and f and "error" not in q:
        x = q["peak_rss_mb"] / f
        out.append({"target": "quantize peak RSS ≤ 1.5x the float folder",
                    "measured": f"{q['peak_rss_mb']:.0f} MB = {x:.2f}x of {f:.0f} MB", "holds": x <= 1.5})
    return out


def versions(a) -> dict:
    code = ("import importlib.metadata as m,json,sys\nout={}\nfor n in sys.argv[1:]:\n try: out[n]=m.version(n)\n"
            " except m.PackageNotFoundError: pass\nprint(json.dumps(out))")
    want = {"edgellama venv": (a.python, ["edgellama", "onnxruntime", "onnxruntime-genai", "onnx", "numpy", "gguf"]),
            "llamacpp venv": (llamacpp_python(a), ["llama-cpp-python"])}
    out = {}
    for k, (py, names) in want.items():
        p = subprocess.run([py, "-c", code, *names], capture_output=True, text=True)
        out[k] = json.loads(p.stdout) if p.returncode == 0 else {"error": p.stderr[-200:]}
    return out


# ----------------------------------------------------------------------------- main

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=HERE / "work" / "scale", help="model files and exports (git-ignored)")
    ap.add_argument("--peers", type=Path, default=HERE / "work" / "peers", help="peer venvs (llamacpp/)")
    ap.add_argument("--python", default=sys.executable, help="edgellama's interpreter (also runs genai's builder)")
    ap.add_argument("--results", type=Path, default=HERE / "results")
    ap.add_argument("--name", default="SCALE", help="results file stem: NAME.md, NAME.json (default SCALE)")
    ap.add_argument("--steps", nargs="+", default=STEPS, choices=STEPS)
    ap.add_argument("--builds", nargs="+", default=BUILDS, choices=BUILDS)
    ap.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=list(SYSTEMS))
    ap.add_argument("--remake", action="store_true", help="rebuild the model files even if present")
    ap.add_argument("--merge", action="store_true", help="keep sections of NAME.json that this run does not redo")
    ap.add_argument("--note", action="append", default=[], help="a line for the report's notes (kept in NAME.json)")
    ap.add_argument("--pool", type=Path, help="another NAME.json of the same models: its speed rounds are put before "
                    "this file's (report step)")
    g = ap.add_argument_group("model shape (Llama-3.2-1B by default)")
    g.add_argument("--hidden", type=int, default=2048)
    g.add_argument("--layers", type=int, default=16)
    g.add_argument("--heads", type=int, default=32)
    g.add_argument("--kv-heads", type=int, default=8)
    g.add_argument("--head-dim", type=int, default=64)
    g.add_argument("--ffn", type=int, default=8192)
    g.add_argument("--vocab", type=int, default=128256)
    g.add_argument("--seed", type=int, default=0)
    ap.add_argument("--build-repeats", type=int, default=1)
    ap.add_argument("--build-timeout", type=float, default=2400, help="seconds before a build step is given up")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=2, help="timed runs per process (median)")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--bw-gib", type=float, default=2.0)
    ap.add_argument("--bw-passes", type=int, default=5)
    a = ap.parse_args(argv)
    a.work, a.peers, a.results = a.work.resolve(), a.peers.absolute(), a.results.resolve()
    return a


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "peer":
        return peer_main(sys.argv[2:])
    a = parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    a.work.mkdir(parents=True, exist_ok=True)
    path = a.results / f"{a.name}.json"
    doc = json.loads(path.read_text()) if path.exists() and (a.merge or a.steps == ["report"]) else {}
    if a.steps != ["report"]:
        import host
        cmd = "python benchmarks/scale.py " + " ".join(sys.argv[1:])
        doc.update({"name": a.name, "measured_at": doc.get("measured_at") or time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "machine": host.machine(), "versions": versions(a)})
        doc.setdefault("commands", []).append(f"{time.strftime('%Y-%m-%dT%H:%M:%S')}: {cmd}")
    doc.setdefault("notes", []).extend(a.note)
    for step in a.steps:
        log(f"=== {step}")
        if step == "make":
            make(a, doc)
            save(a, doc)
        elif step == "build":
            if not os.path.exists("/usr/bin/time"):
                sys.exit("GNU time missing: apt-get install -y time")
            run_builds(a, doc)
        elif step == "bandwidth":
            bandwidth(a, doc, "before speed")
        elif step == "speed":
            bytes_per_token(a, doc)
            run_speed(a, doc)
            if "bandwidth" in a.steps:
                bandwidth(a, doc, "after speed")
        elif step == "report":
            if a.pool:
                pool_rounds(doc, json.loads(a.pool.read_text()))
                save(a, doc)
            if "speed" not in a.steps:
                bytes_per_token(a, doc)
            a.results.mkdir(parents=True, exist_ok=True)
            text = report(doc)
            (a.results / f"{a.name}.md").write_text(text)
            print(text)
            log(f"wrote {a.results / (a.name + '.md')}")


if __name__ == "__main__":
    main()
