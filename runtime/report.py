"""Human-readable reports for the CLI: a model folder's description, next-token probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from . import artifact
from . import contract as io
from .contract import Manifest
from .errors import BadModelFileError

if TYPE_CHECKING:
    from .model import Model


def describe(folder: Path) -> str:
    """The manifest as JSON, then the graph's inputs and outputs with shapes and types."""
    import onnx  # only the inspect command needs it

    folder = Path(folder)
    if artifact.is_bundle(folder):
        with artifact.unpacked(folder) as files:
            return f"bundle {folder}: every file matches SHA256SUMS\n" + describe(files)
    manifest = Manifest.load(folder)
    if manifest.compiled and manifest.compiled.get("format") == "ort":
        ops = folder / "required_operators.config"
        listed = ops.read_text(encoding="utf-8").rstrip() if ops.is_file() else "(required_operators.config missing)"
        return "\n".join([manifest.to_json().rstrip(), "", "graph: model.ort (ORT format); operators:", listed])
    graph_path = folder / io.GRAPH_NAME
    try:
        graph = onnx.load(str(graph_path), load_external_data=False).graph
    except Exception as exc:  # protobuf's DecodeError and friends
        raise BadModelFileError(f"{graph_path}: cannot read the graph ({exc})") from None
    lines = [manifest.to_json().rstrip(), "", f"graph: {len(graph.node)} nodes, {len(graph.initializer)} initializers"]
    for title, values in (("inputs", graph.input), ("outputs", graph.output)):
        lines.append(f"{title}:")
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param or d.dim_value for d in t.shape.dim]
            lines.append(f"  {v.name:32s} {onnx.TensorProto.DataType.Name(t.elem_type).lower():8s} {dims}")
    return "\n".join(lines)


def format_probs(model: "Model", prompt: str | None, top: list[tuple[int, float]]) -> str:
    """'The best thing about AI is its ability to → learn 4.5 %, predict 3.5 %, ...'"""
    shown = ", ".join(f"{model.decode([tid]).strip() or repr(model.decode([tid]))} {p * 100:.1f} %" for tid, p in top)
    return f"{prompt} → {shown}" if prompt is not None else f"→ {shown}"
