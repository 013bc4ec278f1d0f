"""`edgellama quantize`: a float model folder -> a block-quantized one (rewrite.py).

`quantize_folder` is the entry point other stages call; it is looked up on first use so
that importing this package loads neither onnx nor the quantizers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .rewrite import quantize_folder

__all__ = ["quantize_folder"]


def __getattr__(name: str) -> Any:
    if name == "quantize_folder":
        from .rewrite import quantize_folder

        return quantize_folder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
