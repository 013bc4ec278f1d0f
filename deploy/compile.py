"""`edgellama compile`: bake onnxruntime's graph optimizations into a model folder.

onnxruntime optimizes every graph when it creates a session (fusions, constant folding)
and then *prepacks* constant weights into its kernels' private layouts (MLAS GEMM panels,
MatMulNBits blocks); for SmolLM2-135M prepacking is most of the session's creation. This
command runs the optimizations once, offline, and can save the packed weights too. onnxruntime
still packs every weight at load (it finds a saved blob by the hash of the packed buffer) and
then maps the saved copy, so saved blobs move the packed weights from the heap to file-backed
pages and speed up fp32 loads (~1.27× cold start on SmolLM2) but not int4 ones
(benchmarks/results/COLD_START.md).

* ``--format onnx``: the optimized graph as model.onnx + model.onnx.data (external
  initializers, so any size works), and on cpu (unless ``--no-prepack``) the prepacked
  weights beside them, memory-mapped at load (onnxruntime repacks to find them, see above).
* ``--format ort``: the optimized graph in ORT format (one flatbuffer file, memory-mapped
  at load) for ONNX Runtime Mobile and minimal builds, plus the reduced operator
  configuration such a build needs (required_operators.config, and
  required_operators_and_types.config for --enable_type_reduction). ORT format cannot
  hold prepacked weights: onnxruntime packs them at load.

Targets: ``cpu`` optimizes with the CPU provider. ``arm64`` prepares a folder for ARM64
boards (Raspberry Pi 4 / 5 class) on any machine: see `rewrite_matmulnbits`; it optimizes with the CPU
provider at most at level ``extended`` (default), whose rewrites are the same on every CPU —
level ``all`` and prepacked weights are laid out for the compiling CPU's instruction set, so
they are refused — and the folder also runs on x86. ``cuda`` optimizes with the CUDA
provider when this onnxruntime has it (every level then holds CUDA-specific fusions);
without it only ``--level basic`` is allowed, because basic rewrites run before graph
partitioning and hold for every provider, while extended and layout rewrites are made
per provider and would bake in CPU kernels. The manifest's ``compiled`` record states
target, format, level, providers, onnxruntime version and (when tied to it) the CPU;
runtime/artifact.py holds the rules a loader checks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnxruntime as ort

from edgellama.buildkit.output import atomic_folder, check_target, copy_model_files
from edgellama.buildkit.quant_options import ACCURACY_LEVELS
from edgellama.runtime import artifact
from edgellama.runtime import contract as io
from edgellama.runtime.contract import Manifest
from edgellama.runtime.errors import BadArgumentError, BadModelFileError, MissingExtraError

_LEVELS = {"basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
           "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
           "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL}
ORT_FORMAT_MAX_BYTES = 2**31 - 2**24  # flatbuffers address 2 GiB; keep room for the graph
OPS_CONFIG = io.REQUIRED_OPERATORS_NAME
OPS_TYPES_CONFIG = "required_operators_and_types.config"


@dataclass(frozen=True)
class CompileOptions:
    target: str = "cpu"  # "cpu" | "cuda" | "arm64"
    format: str = "onnx"  # "onnx" | "ort"
    level: str | None = None  # "basic" | "extended" | "all"; None: all, extended for arm64
    # Save prepacked weights (cpu, onnx format only). None: for float models only — a prepacked
    # int4 graph is ~1.8x the size (274 vs 149 MB on SmolLM2) and loads no faster.
    prepack: bool | None = None
    force: bool = False
    # Rewrite every MatMulNBits to this accuracy level (4: int8 activations, 1: float compute).
    # None: as the source was made.
    accuracy_level: int | None = None

    def __post_init__(self) -> None:
        if self.level is None:
            object.__setattr__(self, "level", "extended" if self.target == "arm64" else "all")
        for name, value, allowed in (("--target", self.target, artifact.TARGETS),
                                     ("--format", self.format, tuple(artifact.FORMATS)),
                                     ("--level", self.level, artifact.LEVELS)):
            if value not in allowed:
                raise BadArgumentError(f"{name} {value!r} is not supported; choose one of {', '.join(allowed)}")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise BadArgumentError(f"--accuracy-level {self.accuracy_level} is not supported; choose one of "
                                   f"{', '.join(map(str, ACCURACY_LEVELS))}")
        if self.target == "arm64" and (self.level == "all" or self.prepack):
            what = "--level all" if self.level == "all" else "--prepack"
            raise BadArgumentError(f"--target arm64 with {what} would bake this machine's CPU layouts into the "
                                   "folder; leave it out (level extended, no prepacked weights)")

    @property
    def saves_prepacked(self) -> bool:
        return bool(self.prepack) and self.target == "cpu" and self.format == "onnx"


Progress = Callable[[int, int, str], None]  # (done, total, what)


def compile_folder(src: Path, out: Path, options: CompileOptions = CompileOptions(),
                   progress: Progress = lambda done, total, what: None) -> Manifest:
    """Write `out`: `src`'s files with its graph optimized (and converted) per `options`.

    Progress phases: "optimize" (onnxruntime loads, optimizes and saves the graph in one
    call: 0/1, then 1/1) and, for --format ort, "operators:files" (the two configs)."""
    src, out = Path(src), Path(out)
    check_target(out, options.force)
    manifest = _source_manifest(src)
    if options.prepack is None:
        options = replace(options, prepack=not manifest.quantization and options.target != "arm64")
    providers = _providers(options)
    graph_in, rewrites = src / io.GRAPH_NAME, None
    if options.target == "arm64" or options.accuracy_level is not None:
        graph_in, rewrites = rewrite_matmulnbits(src / io.GRAPH_NAME, arm64=options.target == "arm64",
                                                 accuracy_level=options.accuracy_level)
    with atomic_folder(out, force=options.force) as tmp:
        skip = {io.GRAPH_NAME, io.GRAPH_DATA_NAME, io.MANIFEST_NAME} | ({io.GENAI_CONFIG_NAME} if options.format == "ort" else set())
        copy_model_files(src, tmp, skip)
        graph = tmp / artifact.FORMATS[options.format]
        progress(0, 1, "optimize")
        _optimize(graph_in, src, graph, options, providers)
        progress(1, 1, "optimize")
        if options.format == "ort":
            write_operator_configs(graph, tmp, progress)
        compiled = manifest_record(options, providers)
        if rewrites is not None:
            compiled["rewrites"] = rewrites
        new = replace(manifest, compiled=compiled)
        (tmp / io.MANIFEST_NAME).write_text(new.to_json(), encoding="utf-8")
    return new


def manifest_record(options: CompileOptions, providers: list[str]) -> dict:
    record = {"target": options.target, "format": options.format, "level": options.level,
              "graph": artifact.FORMATS[options.format], "onnxruntime": ort.__version__,
              "providers": providers, "prepacked": options.saves_prepacked}
    if options.saves_prepacked or (options.target == "cpu" and options.level == "all"):
        record["cpu"] = artifact.cpu_fingerprint()
    return record


# --accuracy-level. MatMulNBits' accuracy_level attribute picks the compute: 4 quantizes the
# activations to int8 (x86 and ARM dot-product kernels), 1 keeps them float. On an ARM board
# decode is bound by memory bandwidth, not compute (README "Decode speed on paper"), so float
# compute gives the float graph's text there at about the same decode speed and a slower prefill;
# on x86, onnxruntime's float path for 4-bit weights is several times slower.
#
# --target arm64. onnxruntime's arm64 build sends a 4-bit MatMulNBits at accuracy level 4 with
# no zero_points input, on a CPU with the dot-product instructions (Cortex-A76: Pi 5; not the
# Pi 4's A72), to KleidiAI's qai8dxp x qsi4c32p kernels (MLAS UseKleidiAI: BlkLen % 32 == 0,
# K % BlkLen == 0, no zero points): activations quantized to int8 with one scale per row
# (all K columns) and the weights' scales rounded to bf16. SmolLM2 int4 there, 512 tokens of
# GPL-3 against float: mean KL 0.019 nats, against x86's int8 path 0.0046, which quantizes
# activations per block of 32. Naming the default zero point (8) as an explicit input keeps the
# same weights and sends the node to MLAS' own NEON int8 kernel, which quantizes activations
# per block as x86 does (measured under qemu, README "ARM64 boards"); on x86 the logits are
# bit-identical to the source's.
def rewrite_matmulnbits(graph: Path, arm64: bool, accuracy_level: int | None) -> tuple[bytes, dict]:
    """`graph` with its MatMulNBits nodes set to `accuracy_level` (None: unchanged) and, for
    `arm64`, the 4-bit ones left at level 4 given explicit zero points (serialized; the weights
    stay in `graph`'s data file), and the manifest's record of what changed."""
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError:
        raise MissingExtraError("--target arm64 and --accuracy-level rewrite the graph with onnx, which this "
                                "install lacks: pip install 'onnx>=1.16'") from None
    try:
        model = onnx.load(str(graph), load_external_data=False)
    except Exception as exc:  # onnx's DecodeError and friends
        raise BadModelFileError(f"{graph}: not a readable ONNX graph ({type(exc).__name__}); re-export the model") from None
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    rewritten = 0
    for node in nodes:
        if accuracy_level is not None:
            _set_int_attribute(node, "accuracy_level", accuracy_level)
        attrs = {a.name: a.i for a in node.attribute}
        if not arm64 or attrs.get("accuracy_level", 0) != 4:
            continue  # KleidiAI takes level 4 only
        if attrs.get("bits", 4) != 4 or (len(node.input) > 3 and node.input[3]):
            continue  # 8-bit and explicit zero points already take MLAS' per-block path
        blocks = -(-attrs["K"] // attrs["block_size"])
        zp = np.full((attrs["N"], -(-blocks // 2)), 0x88, np.uint8)  # (N, ceil(nb/2)): two 4-bit 8s a byte
        name = f"{node.output[0]}.arm64_zero_points"
        model.graph.initializer.append(numpy_helper.from_array(zp, name))
        if len(node.input) > 3:  # an empty slot before g_idx / bias
            node.input[3] = name
        else:
            node.input.extend([""] * (3 - len(node.input)) + [name])
        rewritten += 1
    rewrites = {"matmulnbits": len(nodes)}
    if arm64:
        rewrites["matmulnbits_explicit_zero_points"] = rewritten
    if accuracy_level is not None:
        rewrites["matmulnbits_accuracy_level"] = accuracy_level
    return model.SerializeToString(), rewrites


def _set_int_attribute(node, name: str, value: int) -> None:
    from onnx import helper

    for attr in node.attribute:
        if attr.name == name:
            attr.i = value
            return
    node.attribute.append(helper.make_attribute(name, value))


def _source_manifest(src: Path) -> Manifest:
    if not src.is_dir():
        raise BadArgumentError(f"{src}: not a model folder; compile a folder from 'edgellama export' or 'quantize'")
    manifest = Manifest.load(src)
    if manifest.compiled:
        raise BadArgumentError(f"{src}: already compiled ({manifest.compiled.get('format')}, "
                               f"{manifest.compiled.get('target')}); compile its source folder instead")
    if not (src / io.GRAPH_NAME).is_file():
        raise BadModelFileError(f"{src / io.GRAPH_NAME}: the graph is missing; re-export the model")
    return manifest


def _providers(options: CompileOptions) -> list[str]:
    if options.target in ("cpu", "arm64"):
        return ["CPUExecutionProvider"]
    if "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if options.level != "basic":
        raise BadArgumentError(
            f"--target cuda --level {options.level} needs onnxruntime-gpu with CUDA on this machine (extended and "
            "layout rewrites are made per provider); use --level basic here, or compile where CUDA is available")
    return ["CPUExecutionProvider"]  # basic rewrites only: provider-independent


def _optimize(graph: Path | bytes, src: Path, out: Path, options: CompileOptions, providers: list[str]) -> None:
    """Optimize `graph` (a file in `src`, or rewritten graph bytes whose weights are `src`'s) into `out`."""
    if options.format == "ort":
        size = (graph.stat().st_size if isinstance(graph, Path) else len(graph)) \
            + sum(p.stat().st_size for p in src.glob(io.GRAPH_DATA_NAME))
        if size > ORT_FORMAT_MAX_BYTES:
            raise BadArgumentError(f"{graph.parent}: {size / 2**30:.1f} GiB of graph and weights do not fit an ORT "
                                   "format file (at most 2 GiB); use --format onnx")
    where = src / io.GRAPH_NAME
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = _LEVELS[options.level]
    opts.optimized_model_filepath = str(out)
    if options.format == "ort":
        opts.add_session_config_entry("session.save_model_format", "ORT")
    else:  # weights stay external (no 2 GB protobuf limit); small constants stay inline
        opts.add_session_config_entry("session.optimized_model_external_initializers_file_name", io.GRAPH_DATA_NAME)
        opts.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    if options.saves_prepacked:
        opts.add_session_config_entry("session.save_external_prepacked_constant_initializers", "1")
    if isinstance(graph, bytes):  # the weights stay in src's data file
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path", str(src))
    try:
        ort.InferenceSession(str(graph) if isinstance(graph, Path) else graph, opts, providers=providers)
    except Exception as exc:  # onnxruntime's untyped errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadModelFileError(f"{where}: onnxruntime cannot optimize this graph ({first})") from None
    if not out.is_file():
        raise BadModelFileError(f"{where}: onnxruntime wrote no optimized graph; check the model with 'edgellama inspect'")


def write_operator_configs(ort_model: Path, folder: Path, progress: Progress = lambda done, total, what: None) -> None:
    """The operators (and, for type reduction, the types) a minimal onnxruntime build
    needs for this model: pass to build.sh --include_ops_by_config."""
    from onnxruntime.tools.ort_format_model import create_config_from_models

    quiet = logging.getLogger("ort_format_model.utils")  # it logs "Created config in <tmp path>"
    configs = ((OPS_CONFIG, False), (OPS_TYPES_CONFIG, True))
    progress(0, len(configs), "operators:files")
    for done, (name, types) in enumerate(configs, 1):
        path = folder / name
        level, quiet.level = quiet.level, logging.WARNING
        try:
            create_config_from_models([ort_model], path, types)
        finally:
            quiet.setLevel(level)
        # The generated header names the (temporary) path it read; name the file instead.
        lines = path.read_text(encoding="utf-8").splitlines()
        lines = [f"# - {ort_model.name}" if line.startswith("# - ") else line for line in lines]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        progress(done, len(configs), "operators:files")
