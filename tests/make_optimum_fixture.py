"""Build the optimum fixture for tests/test_optimum.py, in optimum's own environment.

optimum-onnx pins transformers 4.x while the test environment uses transformers 5, so
scripts/test.sh runs this with a separate venv:

    python tests/make_optimum_fixture.py OUT

OUT/hf    a tiny random Llama saved with save_pretrained (+ tokenizer)
OUT/onnx  `optimum` text-generation-with-past export of it
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"


def main(out: Path) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from conftest import make_tiny  # the same tiny model every other test uses
    from optimum.exporters.onnx import main_export

    make_tiny(out / "hf")
    main_export(str(out / "hf"), str(out / "onnx"), task="text-generation-with-past")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
