"""edgellama: Llama-family models to ONNX, quantized and run on the edge.

    from edgellama import Model
    model = Model.load("smollm2-int4")
    print(model.generate_text("The capital of France is", max_new_tokens=8))

Importing edgellama loads nothing else: the runtime (onnxruntime, numpy) is imported on
first use of one of the names below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# name -> module that defines it
_LAZY = {
    "Model": "edgellama.runtime.model",
    "ChatSession": "edgellama.runtime.model",
    "GenerationConfig": "edgellama.runtime.generate",
    "SamplingParams": "edgellama.runtime.sampling",
    "EdgeLlamaError": "edgellama.runtime.errors",
}
__all__ = ["__version__", *_LAZY]

if TYPE_CHECKING:
    from edgellama.runtime.errors import EdgeLlamaError
    from edgellama.runtime.generate import GenerationConfig
    from edgellama.runtime.model import ChatSession, Model
    from edgellama.runtime.sampling import SamplingParams


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'edgellama' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
