"""What an app embeds: Model.load + generate import onnxruntime, numpy, tokenizers and
jinja2, nothing of the export side (onnx, gguf), the references (torch, transformers) or
the CLI (click). The runtime-only install (`pip install edgellama`, no extras) runs, chats,
inspects, benches and evaluates; export and quantize name the extra to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from edgellama.exporter.export import export

ROOT = Path(__file__).resolve().parents[1]
NOT_RUNTIME = ["onnx", "gguf", "safetensors", "torch", "transformers", "click", "starlette", "uvicorn"]

# Runs in a fresh interpreter with the packages above made unimportable, as on an install
# without them; prints the modules that loaded.
BLOCKED = """
import importlib.abc, json, sys
BLOCK = set(sys.argv[2].split(","))
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCK:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)")
sys.meta_path.insert(0, Block())
from edgellama import Model
model = Model.load(sys.argv[1], threads=1)
text = model.generate_text("The quick brown", max_new_tokens=4, ignore_eos=True)
reply = model.chat().send("hi")
from edgellama.tools.report import describe
described = describe(sys.argv[1])
from edgellama.tools.evaluate import evaluate
ppl = evaluate(model, "The quick brown fox jumps over the lazy dog.", window=8).perplexity
print(json.dumps({"modules": sorted(m.split(".")[0] for m in sys.modules), "text": text,
                  "described": "logits" in described, "ppl": ppl}))
"""


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    from conftest import make_tiny

    base = tmp_path_factory.mktemp("runtime-only")
    make_tiny(base / "hf")
    export(base / "hf", base / "onnx")
    return base / "onnx"


def test_load_generate_inspect_eval_import_nothing_else(tiny_model):
    out = subprocess.run([sys.executable, "-c", BLOCKED, str(tiny_model), ",".join(NOT_RUNTIME)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not set(result["modules"]) & set(NOT_RUNTIME), set(result["modules"]) & set(NOT_RUNTIME)
    assert {"onnxruntime", "numpy", "tokenizers", "jinja2"} <= set(result["modules"])
    assert result["text"] and result["described"] and result["ppl"] > 1


def test_importing_edgellama_is_cheap():
    code = "import sys, edgellama; print(sorted(m for m in ('onnxruntime', 'numpy', 'tokenizers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.slow
def test_runtime_only_install(tiny_model, tmp_path):
    """`pip install .` into a fresh venv (no extras): run, inspect and bench work; export and
    quantize say which extra to install, in one line."""
    src = tmp_path / "src"  # a copy: pip's in-tree build/ never lands in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv*", "build", "*.egg-info", "work",
                                                             "__pycache__", ".pytest_cache"))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    bin_dir = env_dir / ("Scripts" if os.name == "nt" else "bin")
    py = bin_dir / "python"
    pip = subprocess.run([str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(src)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    listed = subprocess.run([str(py), "-c", "import importlib.metadata as m; print(sorted(d.metadata['Name'].lower() "
                             "for d in m.distributions()))"], capture_output=True, text=True, check=True).stdout
    assert not any(f"'{name}'" in listed for name in ("onnx", "torch", "transformers", "gguf")), listed
    cli = str(bin_dir / "edgellama")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}

    def edgellama(*args):
        return subprocess.run([cli, *args], capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)

    r = edgellama("inspect", str(tiny_model))
    assert r.returncode == 0 and "past_key_values.1.value" in r.stdout, r.stderr
    r = edgellama("run", str(tiny_model), "--prompt", "The quick", "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = edgellama("bench", str(tiny_model), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1", "--no-cold")
    assert r.returncode == 0 and "decode" in r.stdout, r.stderr
    for args in (["export", str(tiny_model), str(tmp_path / "x")], ["quantize", str(tiny_model), str(tmp_path / "y")]):
        r = edgellama(*args)
        lines = r.stderr.strip().splitlines()
        assert r.returncode != 0 and len(lines) == 1 and "pip install 'onnx>=1.16' 'safetensors>=0.4' 'gguf>=0.10'" in lines[0], r.stderr
        assert not (tmp_path / args[-1]).exists()
    size = sum(f.stat().st_size for f in (env_dir / "lib").rglob("*") if f.is_file()) / 2**20
    print(f"runtime-only venv site-packages: {size:.0f} MiB")
