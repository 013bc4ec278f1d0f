"""Human-readable reports for the CLI: a model folder's description, next-token probabilities."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgellama.runtime import contract as io
from edgellama.runtime.adapters import read_manifest
from edgellama.runtime.bundle import is_bundle, unpacked

from .graph_info import read_graph_info

if TYPE_CHECKING:
    from edgellama.runtime.model import Model


def describe(folder: Path) -> str:
    """The manifest as JSON, then the graph's inputs and outputs with shapes and types."""
    folder = Path(folder)
    if is_bundle(folder):
        with unpacked(folder) as files:
            return f"bundle {folder}: every file matches SHA256SUMS\n" + describe(files)
    manifest = read_manifest(folder)
    if manifest.compiled and manifest.compiled.get("format") == "ort":
        ops = folder / io.REQUIRED_OPERATORS_NAME
        listed = ops.read_text(encoding="utf-8").rstrip() if ops.is_file() else f"({ops.name} missing)"
        return "\n".join([manifest.to_json().rstrip(), "", f"graph: {io.ORT_GRAPH_NAME} (ORT format); operators:",
                          listed])
    info = read_graph_info(folder / io.GRAPH_NAME)
    lines = [manifest.to_json().rstrip(), "", f"graph: {info.nodes} nodes, {info.initializers} initializers"]
    for title, values in (("inputs", info.inputs), ("outputs", info.outputs)):
        lines.append(f"{title}:")
        lines += [f"  {v.name:32s} {v.type:8s} {v.shape}" for v in values]
    return "\n".join(lines)


def format_probs(model: "Model", prompt: str | None, top: list[tuple[int, float]]) -> str:
    """'The best thing about AI is its ability to → " learn" 4.5 %, " predict" 3.5 %, ...': each
    token quoted as JSON writes it, so " Paris" and "Paris" (or a newline) stay apart."""
    import json

    shown = ", ".join(f"{json.dumps(_token_text(model, tid), ensure_ascii=False)} {p * 100:.1f} %" for tid, p in top)
    return f"{prompt} → {shown}" if prompt is not None else f"→ {shown}"


def _token_text(model: "Model", tid: int) -> str:
    """The token as text; a special token (which decode skips) by its name."""
    text = model.decode([tid])
    if text and "\ufffd" not in text:
        return text
    # a special token (decode skips it) or a piece of a UTF-8 character: the vocabulary's own name
    return model.tokenizer.id_to_token(tid) or f"<id {tid}>"
