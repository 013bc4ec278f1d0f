#!/usr/bin/env python3
"""One system's greedy decoding, plain and speculative, on given chat prompts (token ids).

Driven by benchmarks/speculative.py, one fresh process per system per round, with the
python that has the system installed:

    python speculative_peer.py --system edgellama --model EL_FOLDER [--draft-model EL_INT4] \
        --modes plain,ngram,draft --ids IDS.json
    python speculative_peer.py --system genai --model GENAI_FOLDER [--draft-model GENAI_INT4] \
        --modes plain,ngram | plain,draft --ids IDS.json
    python speculative_peer.py --system llamacpp --model MODEL.gguf --modes plain,lookup --ids IDS.json
    python speculative_peer.py --system transformers --model FLOAT_DIR [--gguf-file F.gguf] \
        --modes plain,lookup --ids IDS.json

IDS.json: {"prompts": [{"id": ..., "set": ..., "ids": [...]}, ...]}: the same token ids
(chat template applied by edgellama) are fed to every system, never text.

Every mode is greedy (argmax), at most --new-tokens new tokens, stopping at EOS (id 2,
<|im_end|>; the EOS itself is not counted). For each prompt the modes run back to back in
this process (their order rotating from prompt to prompt), after one warm-up generation per
mode. Per prompt and mode: the new token ids, ``decode_tok_s`` = (n - 1) / (time from the
first new token to the last), i.e. prefill excluded, the system's own speculation counters
where it has them, and other processes' CPU use meanwhile (cpuload.py).

Modes:
* edgellama: plain | ngram (speculate="ngram", NGram(max_ngram=--ngram)) | draft
  (speculate=Draft(Model.load(--draft-model))); draft_tokens=--draft-tokens (adaptive below).
* genai: plain | ngram (GeneratorParams.set_speculative_options(ngram_size=--ngram,
  max_draft_tokens=--draft-tokens)) | draft (the --draft-model folder's decoder given as
  genai_config model.draft, set_speculative_options(max_draft_tokens=--draft-tokens)).
* llamacpp: plain (Llama.generate, temp 0) | lookup (Llama(draft_model=
  LlamaPromptLookupDecoding(num_pred_tokens=--draft-tokens, max_ngram_size=--ngram))).
  Forwards counted by wrapping Llama.eval.
* transformers: plain | lookup (generate(prompt_lookup_num_tokens=--draft-tokens,
  max_matching_ngram_size=--ngram)); forwards counted by wrapping model.forward.
"""
import argparse
import copy
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpuload import ForeignLoad, wait_quiet  # noqa: E402
from decode_peer import versions  # noqa: E402

EOS = 2  # <|im_end|>


def _cut(tokens, times):
    """Tokens up to (not including) the first EOS, with their times."""
    for i, t in enumerate(tokens):
        if t == EOS:
            return tokens[:i], times[:i]
    return tokens, times


# --------------------------------------------------------------------------- systems
# run(ids, mode, n) -> (tokens, per-token perf_counter times, stats dict or None)

class Edgellama:
    def __init__(self, a):
        from edgellama import Model
        self.model = Model.load(a.model, threads=a.threads)
        self.a = a
        self.draft = None
        if a.draft_model:
            from edgellama.runtime.speculate import Draft
            self.draft = Draft(Model.load(a.draft_model, threads=a.threads))

    def run(self, ids, mode, n):
        from edgellama.runtime.speculate import NGram
        spec = {"plain": None, "ngram": NGram(max_ngram=self.a.ngram), "draft": self.draft}[mode]
        g = self.model.generate(list(ids), max_new_tokens=n, speculate=spec,
                                draft_tokens=self.a.draft_tokens if spec is not None else 8)
        toks, times = [], []
        for s in g:
            if s.token_id is not None:
                toks.append(s.token_id)
                times.append(time.perf_counter())
        return toks, times, (g.speculation.to_dict() if spec is not None else None)


class Genai:
    def __init__(self, a):
        import onnxruntime_genai as og
        self.og, self.a = og, a
        so = {"intra_op_num_threads": a.threads, "inter_op_num_threads": 1}
        self.models = {}
        cfg = og.Config(a.model)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}}}))
        self.models["plain"] = self.models["ngram"] = og.Model(cfg)
        if a.draft_model:
            with open(os.path.join(a.draft_model, "genai_config.json")) as f:
                draft = copy.deepcopy(json.load(f)["model"]["decoder"])
            draft["filename"] = os.path.relpath(os.path.join(os.path.abspath(a.draft_model), draft["filename"]),
                                                os.path.abspath(a.model))
            draft.setdefault("session_options", {}).update(so)
            cfg = og.Config(a.model)
            cfg.overlay(json.dumps({"model": {"decoder": {"session_options": so}, "draft": draft}}))
            self.models["draft"] = og.Model(cfg)

    def run(self, ids, mode, n):
        og = self.og
        model = self.models[mode]
        p = og.GeneratorParams(model)
        p.set_search_options(do_sample=False, max_length=len(ids) + n)
        if mode == "ngram":
            p.set_speculative_options(ngram_size=self.a.ngram, max_draft_tokens=self.a.draft_tokens)
        elif mode == "draft":
            p.set_speculative_options(max_draft_tokens=self.a.draft_tokens)
        g = og.Generator(model, p)
        g.append_tokens(list(ids))
        toks, times = [], []
        while not g.is_done() and len(toks) < n:
            g.generate_next_token()
            t = int(g.get_next_tokens()[0])
            toks.append(t)
            times.append(time.perf_counter())
            if t == EOS:
                break
        stats = None
        if mode != "plain":
            s = g.get_speculative_stats()
            keep = ("draft_tokens_proposed", "draft_tokens_evaluated", "draft_tokens_accepted", "target_forward_passes",
                    "draft_forward_passes", "acceptance_rate", "effective_k", "standard_fallback_steps",
                    "tokens_emitted")
            stats = {k: s[k] for k in keep if k in s}
            stats = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in stats.items()}
            stats["forwards"] = s.get("target_forward_passes")
            stats["drafted"] = s.get("draft_tokens_evaluated")
            stats["accepted"] = s.get("draft_tokens_accepted")
        return toks, times, stats


class LlamaCpp:
    def __init__(self, a):
        from llama_cpp import Llama
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
        kw = dict(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=2048, n_batch=512,
                  verbose=False)
        self.llms = {"plain": Llama(**kw),
                     # logits_all=True: llama-cpp-python 0.3.36 sizes its scores buffer from the logits_all
                 # argument (n_batch rows without it), so a draft run past n_batch tokens fails with
                 # "could not broadcast input array" although draft_model forces logits_all on.
                 "lookup": Llama(**kw, logits_all=True, draft_model=LlamaPromptLookupDecoding(
                         num_pred_tokens=a.draft_tokens, max_ngram_size=a.ngram))}
        self.calls = {}
        for mode, llm in self.llms.items():
            self._count(mode, llm)

    def _count(self, mode, llm):
        inner = llm.eval
        self.calls[mode] = 0

        def ev(tokens):
            self.calls[mode] += 1
            return inner(tokens)
        llm.eval = ev

    def run(self, ids, mode, n):
        llm = self.llms[mode]
        llm.reset()
        self.calls[mode] = 0
        toks, times = [], []
        for t in llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0, reset=True):
            toks.append(int(t))
            times.append(time.perf_counter())
            if t == EOS or len(toks) >= n:
                break
        forwards = self.calls[mode] - 1  # the first eval is the prompt's
        return toks, times, ({"forwards": forwards} if mode != "plain" else None)


class Transformers:
    def __init__(self, a):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(a.threads)
        self.torch, self.a = torch, a
        kw = {"gguf_file": a.gguf_file} if a.gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, **kw).eval()
        self.forwards = 0
        inner = self.model.forward

        def fwd(*args, **kwargs):
            self.forwards += 1
            return inner(*args, **kwargs)
        self.model.forward = fwd

    def run(self, ids, mode, n):
        torch = self.torch
        times, toks = [], []

        class Streamer:
            seen = False

            def put(self, value):
                if not Streamer.seen:   # generate() first puts the prompt
                    Streamer.seen = True
                    return
                now = time.perf_counter()
                for x in value.reshape(-1).tolist():
                    toks.append(int(x))
                    times.append(now)

            def end(self):
                pass

        inp = torch.tensor([list(ids)], dtype=torch.long)
        kw = {"prompt_lookup_num_tokens": self.a.draft_tokens, "max_matching_ngram_size": self.a.ngram} \
            if mode == "lookup" else {}
        self.forwards = 0
        with torch.inference_mode():
            self.model.generate(inp, attention_mask=torch.ones_like(inp), max_new_tokens=n, do_sample=False,
                                num_beams=1, streamer=Streamer(), eos_token_id=EOS, pad_token_id=EOS, **kw)
        return toks, times, ({"forwards": self.forwards - 1} if mode != "plain" else None)


SYSTEMS = {"edgellama": Edgellama, "genai": Genai, "llamacpp": LlamaCpp, "transformers": Transformers}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", required=True, choices=sorted(SYSTEMS))
    ap.add_argument("--model", required=True)
    ap.add_argument("--draft-model", default=None)
    ap.add_argument("--gguf-file", default=None, help="transformers: load this GGUF from --model")
    ap.add_argument("--modes", required=True, help="comma-separated, plain first")
    ap.add_argument("--ids", required=True)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--draft-tokens", type=int, default=8)
    ap.add_argument("--ngram", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    modes = a.modes.split(",")
    with open(a.ids) as f:
        prompts = json.load(f)["prompts"]

    t = time.perf_counter()
    sysm = SYSTEMS[a.system](a)
    load_s = time.perf_counter() - t
    for m in modes:  # warm-up, each mode
        sysm.run(prompts[0]["ids"], m, 16)

    out = []
    for i, p in enumerate(prompts):
        wait_quiet(max_wait_s=float(os.environ.get("CPULOAD_MAX_WAIT_S", "5")))
        order = modes[i % len(modes):] + modes[:i % len(modes)]
        res = {}
        for m in order:
            with ForeignLoad() as fl:
                toks, times, stats = sysm.run(p["ids"], m, a.new_tokens)
            toks, times = _cut(toks, times)
            dt = times[-1] - times[0] if len(times) > 1 else 0.0
            res[m] = {"n": len(toks), "decode_s": round(dt, 4),
                      "decode_tok_s": round((len(toks) - 1) / dt, 2) if dt > 0 else None,
                      "stats": stats, "foreign_cpus": round(fl.cpus, 3), "tokens": toks}
        out.append({"id": p["id"], "set": p["set"], "order": order, "modes": res})
        print(f"{a.system} {p['id']}: " + ", ".join(f"{m} {res[m]['decode_tok_s']} tok/s ({res[m]['n']})"
                                                     for m in modes), file=sys.stderr, flush=True)
    json.dump({"system": a.system, "model": a.model, "draft_model": a.draft_model, "modes": modes,
               "versions": versions(a.system), "load_s": round(load_s, 3), "prompts": out}, sys.stdout)


if __name__ == "__main__":
    main()
