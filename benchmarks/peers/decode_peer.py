#!/usr/bin/env python3
"""Greedy-decode benchmark of one peer system on SmolLM2-135M (2 threads, CPU).

Run it with the python of the peer's own venv (their dependencies conflict; $PEERS is
the folder setup_peers.sh fills, compare.py drives this script for every system):

    $PEERS/genai/bin/python    decode_peer.py --system genai        --model GENAI_EXPORT_DIR
    $PEERS/llamacpp/bin/python decode_peer.py --system llamacpp     --model SmolLM2-135M-Instruct.Q4_1.gguf
    $PEERS/optimum/bin/python  decode_peer.py --system optimum      --model OPTIMUM_EXPORT_DIR
    $PEERS/optimum/bin/python  decode_peer.py --system transformers --model FLOAT_COPY_DIR
    python                     decode_peer.py --system edgellama    --model EXPORT_DIR

What it measures (one JSON object on stdout):

* decode: 128 greedy new tokens from PROMPT_IDS (no BOS).  The first new token comes
  out of the prompt's forward pass; the other 127 each cost one decode step.
  ``decode_tok_s`` = 127 / (time from first to last new token), i.e. prefill excluded;
  ``e2e_tok_s`` = 128 / (time from the start of the prompt's forward to the last token).
  Warm (model loaded, one warm-up generation first), median of --runs.
* prefill: one forward pass over the first 512 tokens of the GPL-3 text
  (ids in prefill_512.json beside this script) up to the first new token;
  ``prefill_tok_s`` = 512 / that time.  Warm, median of --runs.
* cold start: --cold-runs fresh processes (``python decode_peer.py --child-ttft``),
  each timed from just before it is spawned until it has the first new token of
  PROMPT_IDS: interpreter start + imports + model load + prompt forward.  Medians of
  that time, of model load alone, and of the child's peak RSS.
* other processes' CPU use during each timed run (``foreign_cpus``, from /proc/stat,
  see cpuload.py): each run waits for a quiet machine and is redone once
  when others used more than 0.25 CPUs meanwhile.  Medians and bests are reported.
* the first 32 new token ids and the text of all 128, detokenised by the peer's own
  tokenizer, plus the ids the peer's tokenizer gives for PROMPT_TEXT (a tokenizer check).

How each peer is driven (greedy = argmax of the last logits, EOS never ends the run
early: genai and transformers get min_length / min_new_tokens = 128, and a run that
still emits an EOS id is flagged in ``eos_in_output``):

* genai: onnxruntime_genai Generator; append_tokens(prompt) then generate_next_token().
  intra_op_num_threads=2 via a genai_config overlay.
* llamacpp: llama_cpp.Llama(n_threads=2, n_threads_batch=2, n_ctx=1024, n_batch=512),
  Llama.eval() + argmax of the last logits row (no sampler chain).
* optimum: ORTModelForCausalLM (onnxruntime session, intra_op_num_threads=2,
  inter_op=1) and transformers' generate(do_sample=False); token times come from a
  streamer.
* edgellama: edgellama.runtime.model.Model.load(threads=2) and Model.generate(ids,
  max_new_tokens=n, ignore_eos=True) (greedy); each yielded Step is one new token, its
  text streamed through edgellama's detokenizer (as `edgellama run` does).
* transformers: AutoModelForCausalLM fp32 (PyTorch eager, default attention),
  torch.set_num_threads(2), generate(do_sample=False) with the same streamer.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from cpuload import ForeignLoad, wait_quiet  # noqa: E402

MAX_FOREIGN = 0.25   # a timed run during which other processes used more CPUs is redone
RETRIES = 2
PROMPT_IDS = [504, 1450, 2775, 563, 5646, 314, 624, 2470, 288]
PROMPT_TEXT = "The best thing about AI is its ability to"
EOS_IDS = {1, 2}  # <|im_start|> (genai's builder adds it as end-of-turn) and <|im_end|>


PREFILL_IDS_FILE = os.path.join(HERE, "prefill_512.json")


def load_prefill_ids():
    with open(PREFILL_IDS_FILE) as f:
        doc = json.load(f)
    return doc.get("ids") or doc["prefill"]


def use_ids(path):
    """Another model's prompts (--ids): a JSON object with "prompt" (ids), "prompt_text" (the
    text they encode) and "prefill" (512 ids); replaces SmolLM2's built-in ones."""
    global PROMPT_IDS, PROMPT_TEXT, PREFILL_IDS_FILE
    with open(path) as f:
        doc = json.load(f)
    PROMPT_IDS, PROMPT_TEXT, PREFILL_IDS_FILE = doc["prompt"], doc["prompt_text"], path


# --------------------------------------------------------------------------- peers
# Each runner: __init__(model, threads) loads; prefill_and_decode(ids, n) returns
# (tokens, t_start, t_first, t_last) with perf_counter times; first_token(ids) returns
# the first new token only; decode_text(ids); encode(text).

class GenaiRunner:
    def __init__(self, model, threads):
        import onnxruntime_genai as og
        self.og = og
        cfg = og.Config(model)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)
        self.tok = og.Tokenizer(self.model)
        # a sliding-window model (Gemma 3) wants a KV buffer at least one window long
        with open(os.path.join(model, "genai_config.json")) as f:
            window = json.load(f)["model"]["decoder"].get("sliding_window") or {}
        self.min_buffer = window.get("window_size", 0)

    def _generator(self, n_prompt, n_new):
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=max(n_prompt + n_new, self.min_buffer),
                                  min_length=n_prompt + n_new)
        return self.og.Generator(self.model, params)

    def prefill_and_decode(self, ids, n):
        gen = self._generator(len(ids), n)
        out = []
        t0 = time.perf_counter()
        gen.append_tokens(ids)          # prompt forward pass
        gen.generate_next_token()       # samples from the prompt's logits
        out.append(int(gen.get_next_tokens()[0]))
        t1 = time.perf_counter()
        while len(out) < n and not gen.is_done():
            gen.generate_next_token()   # one decode step + sample
            out.append(int(gen.get_next_tokens()[0]))
        t2 = time.perf_counter()
        return out, t0, t1, t2

    def first_token(self, ids):
        gen = self._generator(len(ids), 1)
        gen.append_tokens(ids)
        gen.generate_next_token()
        return int(gen.get_next_tokens()[0])

    def decode_text(self, ids):
        return self.tok.decode(ids)

    def encode(self, text):
        return [int(x) for x in self.tok.encode(text)]


class LlamaCppRunner:
    def __init__(self, model, threads):
        import numpy as np
        from llama_cpp import Llama
        self.np = np
        self.llm = Llama(model_path=model, n_threads=threads, n_threads_batch=threads,
                         n_ctx=1024, n_batch=512, verbose=False)
        self.n_vocab = self.llm.n_vocab()

    def _next(self):
        # Llama.scores is only filled with logits_all=True; read the last row directly.
        logits = self.np.ctypeslib.as_array(self.llm._ctx.get_logits_ith(-1),
                                            shape=(self.n_vocab,))
        return int(self.np.argmax(logits))

    def prefill_and_decode(self, ids, n):
        llm = self.llm
        llm.reset()
        out = []
        t0 = time.perf_counter()
        llm.eval(ids)
        out.append(self._next())
        t1 = time.perf_counter()
        while len(out) < n:
            llm.eval([out[-1]])
            out.append(self._next())
        t2 = time.perf_counter()
        return out, t0, t1, t2

    def first_token(self, ids):
        self.llm.reset()
        self.llm.eval(ids)
        return self._next()

    def decode_text(self, ids):
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    def encode(self, text):
        return self.llm.tokenize(text.encode(), add_bos=False, special=False)


class _TimingStreamer:
    """transformers streamer: records perf_counter at each new-token put()."""

    def __init__(self):
        self.times, self.tokens, self._prompt_seen = [], [], False

    def put(self, value):
        if not self._prompt_seen:      # generate() first puts the prompt
            self._prompt_seen = True
            return
        self.times.append(time.perf_counter())
        self.tokens.extend(int(x) for x in value.reshape(-1).tolist())

    def end(self):
        pass


class _HFGenerateRunner:
    def prefill_and_decode(self, ids, n):
        import torch
        inp = torch.tensor([ids], dtype=torch.long)
        streamer = _TimingStreamer()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(inp, attention_mask=torch.ones_like(inp),
                                      max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                      num_beams=1, streamer=streamer,
                                      pad_token_id=self.tok.eos_token_id)
        t2 = time.perf_counter()
        toks = [int(x) for x in out[0, len(ids):].tolist()]
        return toks, t0, streamer.times[0], streamer.times[-1] if len(toks) > 1 else t2

    def first_token(self, ids):
        return self.prefill_and_decode(ids, 1)[0][0]

    def decode_text(self, ids):
        return self.tok.decode(ids, skip_special_tokens=False)

    def encode(self, text):
        return self.tok(text)["input_ids"]


class OptimumRunner(_HFGenerateRunner):
    def __init__(self, model, threads):
        import onnxruntime as ort
        from optimum.onnxruntime import ORTModelForCausalLM
        from transformers import AutoTokenizer
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.model = ORTModelForCausalLM.from_pretrained(
            model, session_options=so, provider="CPUExecutionProvider", use_cache=True)
        self.tok = AutoTokenizer.from_pretrained(model)


class TransformersRunner(_HFGenerateRunner):
    def __init__(self, model, threads):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        torch.set_num_threads(threads)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
        self.tok = AutoTokenizer.from_pretrained(model)


class EdgellamaRunner:
    def __init__(self, model, threads):
        from edgellama.runtime.model import Model
        self.model = Model.load(model, threads=threads)

    def prefill_and_decode(self, ids, n):
        gen = self.model.generate(list(ids), max_new_tokens=n, ignore_eos=True)
        steps = iter(gen)
        out = []
        t0 = time.perf_counter()
        out.append(next(steps).token_id)   # prompt forward pass + first token
        t1 = time.perf_counter()
        for step in steps:
            if step.token_id is not None:   # a final text-only flush step has no token
                out.append(step.token_id)
        t2 = time.perf_counter()
        return out, t0, t1, t2

    def first_token(self, ids):
        return next(iter(self.model.generate(list(ids), max_new_tokens=1, ignore_eos=True))).token_id

    def decode_text(self, ids):
        return self.model.decode(ids)

    def encode(self, text):
        return self.model.encode(text, add_special_tokens=False)


RUNNERS = {"genai": GenaiRunner, "edgellama": EdgellamaRunner, "llamacpp": LlamaCppRunner,
           "optimum": OptimumRunner, "transformers": TransformersRunner}


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def versions(system):
    return package_versions({"genai": ["onnxruntime-genai", "onnxruntime"],
                             "llamacpp": ["llama-cpp-python"],
                             "optimum": ["optimum-onnx", "optimum", "onnxruntime", "transformers", "torch"],
                             "transformers": ["transformers", "torch"],
                             "edgellama": ["edgellama", "onnxruntime"]}[system])


def package_versions(names):
    """{package: version} for those of `names` installed in this interpreter."""
    import importlib.metadata as md
    out = {}
    for n in names:
        try:
            out[n] = md.version(n)
        except md.PackageNotFoundError:
            pass
    return out


# --------------------------------------------------------------------------- modes

def child_ttft(args):
    """In a fresh process: load, first token of PROMPT_IDS; print wall-clock stamps."""
    t_load0 = time.perf_counter()
    runner = RUNNERS[args.system](args.model, args.threads)
    t_load1 = time.perf_counter()
    tok = runner.first_token(PROMPT_IDS)
    t_first = time.time()
    print(json.dumps({"t_first_wall": t_first, "load_s": t_load1 - t_load0,
                      "first_forward_s": time.perf_counter() - t_load1,
                      "first_token": tok, "peak_rss_mb": peak_rss_mb()}))


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def quiet_run(fn):
    """Run fn() on a quiet machine; redo it (up to RETRIES) if others loaded the CPUs.

    Returns (fn's result, foreign CPUs during the kept run)."""
    for attempt in range(RETRIES):
        wait_quiet(log=log)
        with ForeignLoad() as fl:
            out = fn()
        if fl.cpus <= MAX_FOREIGN:
            break
        log(f"foreign load {fl.cpus:.2f} CPUs during a timed run (attempt {attempt + 1})")
    return out, round(fl.cpus, 3)


def cold_starts(args):
    res = []
    cmd = [sys.executable, os.path.abspath(__file__), "--child-ttft",
           "--system", args.system, "--model", args.model, "--threads", str(args.threads)]
    cmd += ["--ids", args.ids] if args.ids else []

    def one():
        t_spawn = time.time()
        p = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
        if p.returncode != 0:
            raise RuntimeError(f"cold-start child failed:\n{p.stderr[-3000:]}")
        r = json.loads(p.stdout.strip().splitlines()[-1])
        r["ttft_s"] = r.pop("t_first_wall") - t_spawn
        return r

    for _ in range(args.cold_runs):
        r, fc = quiet_run(one)
        r["foreign_cpus"] = fc
        res.append(r)
    med = lambda k: round(statistics.median(r[k] for r in res), 4)  # noqa: E731
    return {"ttft_cold_s": med("ttft_s"), "best_ttft_cold_s": round(min(r["ttft_s"] for r in res), 4), "load_s": med("load_s"),
            "first_forward_s": med("first_forward_s"), "peak_rss_mb": med("peak_rss_mb"),
            "runs": res}


def warm(args):
    t = time.perf_counter()
    runner = RUNNERS[args.system](args.model, args.threads)
    load_s = time.perf_counter() - t
    n = args.new_tokens
    prefill_ids = load_prefill_ids()

    runner.prefill_and_decode(PROMPT_IDS, 16)           # warm-up
    decode, e2e, tokens, foreign = [], [], None, {"decode": [], "prefill_512": []}
    for _ in range(args.runs):
        (toks, t0, t1, t2), fc = quiet_run(lambda: runner.prefill_and_decode(PROMPT_IDS, n))
        foreign["decode"].append(fc)
        if tokens is None:
            tokens = toks
        elif toks != tokens:
            print("WARNING: greedy tokens differ between runs", file=sys.stderr)
        decode.append((len(toks) - 1) / (t2 - t1))
        e2e.append(len(toks) / (t2 - t0))

    runner.prefill_and_decode(prefill_ids, 1)           # warm-up at this shape
    prefill = []
    for _ in range(args.runs):
        (_, t0, t1, _), fc = quiet_run(lambda: runner.prefill_and_decode(prefill_ids, 1))
        foreign["prefill_512"].append(fc)
        prefill.append(len(prefill_ids) / (t1 - t0))

    return {
        "decode_tok_s": round(statistics.median(decode), 2),
        "e2e_tok_s": round(statistics.median(e2e), 2),
        "prefill_512_tok_s": round(statistics.median(prefill), 1),
        "best_decode_tok_s": round(max(decode), 2),
        "best_prefill_512_tok_s": round(max(prefill), 1),
        "runs": {"decode_tok_s": [round(x, 2) for x in decode],
                 "e2e_tok_s": [round(x, 2) for x in e2e],
                 "prefill_512_tok_s": [round(x, 1) for x in prefill],
                 "foreign_cpus": foreign},
        "n_generated": len(tokens),
        "eos_in_output": sorted(set(tokens) & EOS_IDS),
        "first32_ids": tokens[:32],
        "text": runner.decode_text(tokens),
        "tokenizer_check": {"text": PROMPT_TEXT, "ids": runner.encode(PROMPT_TEXT),
                            "matches_prompt_ids": runner.encode(PROMPT_TEXT) == PROMPT_IDS},
        "warm_process_load_s": round(load_s, 3),
        "warm_process_peak_rss_mb": round(peak_rss_mb(), 1),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--system", required=True, choices=sorted(RUNNERS))
    ap.add_argument("--model", required=True, help="model folder (GGUF file for llamacpp)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--runs", type=int, default=3, help="warm repeats (median)")
    ap.add_argument("--cold-runs", type=int, default=3, help="fresh processes for TTFT")
    ap.add_argument("--ids", help="JSON {prompt, prompt_text, prefill}: another model's ids (default: SmolLM2's)")
    ap.add_argument("--child-ttft", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ids:
        use_ids(args.ids)

    if args.child_ttft:
        return child_ttft(args)

    res = {"system": args.system, "model": args.model, "threads": args.threads,
           "new_tokens": args.new_tokens, "prompt_ids": PROMPT_IDS,
           "versions": versions(args.system)}
    res.update(warm(args))
    if args.cold_runs > 0:
        res["cold_start"] = cold_starts(args)
    res["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    print(json.dumps(res, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
