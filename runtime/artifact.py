"""What the runtime checks before it runs a compiled artifact.

A compiled folder (`edgellama compile`, written by `edgellama.deploy`, which may import onnx;
this module may not): the manifest's ``compiled`` record says which graph file to load, for
which target and with which onnxruntime it was optimized. `load_plan` refuses an artifact
this process cannot run correctly, and tells the session not to optimize again what was
baked in. (Bundles from `edgellama pack` are read by bundle.py.)

Compatibility rules (checked in this order, each refusal one line):

1. target: an artifact compiled for ``cpu`` or ``arm64`` loads only with provider cpu,
   one for ``cuda`` only with cuda (provider-specific fusions and kernels are baked in).
   An ``arm64`` folder (level basic or extended, never prepacked) runs on any CPU, x86 too.
2. onnxruntime: same major.minor as the compiler's (optimized graphs use internal
   fused ops whose kernels change between minor releases); exactly the same version
   when prepacked weights are baked in (their byte layout is private to a build).
3. CPU: an artifact with prepacked weights or optimized at level ``all`` for cpu was
   laid out for the instruction sets of the machine that compiled it (MLAS packs
   weights per ISA; onnxruntime says level-all graphs are hardware specific): the
   machine architecture and the ISA features below must match exactly.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path

import onnxruntime as ort

from . import contract as io
from .contract import Manifest
from .errors import BadArgumentError, BadModelFileError

TARGETS = ("cpu", "cuda", "arm64")
FORMATS = {"onnx": io.GRAPH_NAME, "ort": io.ORT_GRAPH_NAME}
LEVELS = ("basic", "extended", "all")
# The provider each target loads with: arm64 folders run on the CPU provider of any machine
# (their graph holds only rewrites that are the same on every CPU; see deploy/compile.py).
TARGET_RUNS_ON = {"cpu": "cpu", "cuda": "cuda", "arm64": "cpu"}
TARGET_PROVIDER = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "arm64": "CPUExecutionProvider"}

# The CPU features MLAS picks kernels (and packed-weight layouts) by; compared as a set.
ISA_FEATURES = (
    "sse4_1", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl",
    "avx512_vnni", "avx_vnni", "avx_vnni_int8", "avx512_bf16", "avx512_fp16", "amx_tile",
    "amx_int8", "amx_bf16",                                                     # x86-64
    "asimd", "asimddp", "asimdhp", "fphp", "i8mm", "bf16", "sve", "sve2", "sme",  # arm64
)


@dataclass(frozen=True)
class LoadPlan:
    """How to open a folder's graph: which file, whether onnxruntime optimizes it again,
    and extra session config entries."""

    graph: Path
    optimize: bool = True
    config: dict[str, str] = field(default_factory=dict)


def cpu_fingerprint() -> dict:
    """{"machine": "x86_64", "isa": [...]}: what a prepacked or level-all artifact is tied to."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("flags", "Features"):
                    flags.update(value.split())
                    break
    except OSError:  # not Linux: the machine name alone (compile on the device itself)
        pass
    return {"machine": platform.machine().lower(), "isa": sorted(flags.intersection(ISA_FEATURES))}


def ort_version_compatible(built: str, running: str, exact: bool) -> bool:
    if exact:
        return built == running
    return built.split(".")[:2] == running.split(".")[:2]


def load_plan(folder: Path, manifest: Manifest, provider: str) -> LoadPlan:
    """The graph to open and how; refuses a compiled artifact this process cannot run."""
    rec = manifest.compiled
    if not rec:
        return LoadPlan(folder / io.GRAPH_NAME)
    where = folder / io.MANIFEST_NAME
    target, fmt, level = rec.get("target"), rec.get("format"), rec.get("level")
    built = str(rec.get("onnxruntime", ""))
    if target not in TARGETS or fmt not in FORMATS or level not in LEVELS or not built:
        raise BadModelFileError(f"{where}: the 'compiled' record is incomplete or unknown ({rec!r}); "
                                "compile the model again")
    if provider != TARGET_RUNS_ON[target]:
        raise BadArgumentError(f"{folder}: compiled for target {target!r} but loaded with provider {provider!r}; "
                               f"use --provider {TARGET_RUNS_ON[target]} or run 'edgellama compile --target "
                               f"{provider}' on the source")
    prepacked = bool(rec.get("prepacked"))
    if not ort_version_compatible(built, ort.__version__, exact=prepacked):
        rule = "exactly that version" if prepacked else f"onnxruntime {'.'.join(built.split('.')[:2])}.x"
        raise BadModelFileError(f"{folder}: compiled with onnxruntime {built}, running {ort.__version__}; "
                                f"this artifact needs {rule}: compile the source model again with this onnxruntime")
    if prepacked or (TARGET_RUNS_ON[target] == "cpu" and level == "all"):
        _check_cpu(folder, rec.get("cpu"))
    graph = folder / FORMATS[fmt]
    config = {}
    if fmt == "ort":  # map the flatbuffer and let initializers point into it: no copy at load
        config = {"session.load_model_format": "ORT", "session.use_memory_mapped_ort_model": "1",
                  "session.use_ort_model_bytes_for_initializers": "1"}
    # Optimized with the target's own provider: every level up to `level` is baked in. A
    # cuda artifact compiled without CUDA holds only the provider-independent (basic)
    # rewrites; onnxruntime adds the CUDA ones at load.
    optimize = TARGET_PROVIDER[target] not in rec.get("providers", [])
    return LoadPlan(graph, optimize=optimize, config=config)


def _check_cpu(folder: Path, built) -> None:
    here = cpu_fingerprint()
    if not isinstance(built, dict) or built.get("machine") != here["machine"] \
            or sorted(built.get("isa", [])) != here["isa"]:
        built = built if isinstance(built, dict) else {}
        missing = sorted(set(built.get("isa", [])) - set(here["isa"]))
        extra = sorted(set(here["isa"]) - set(built.get("isa", [])))
        detail = f"{built.get('machine')!r} vs this {here['machine']!r}" if built.get("machine") != here["machine"] \
            else f"this CPU lacks {missing or 'nothing'}, adds {extra or 'nothing'}"
        raise BadModelFileError(f"{folder}: compiled for another CPU ({detail}); its prepacked weights or "
                                "level-all graph would be wrong here: compile on this machine, or with "
                                "--no-prepack --level extended for a portable artifact")
