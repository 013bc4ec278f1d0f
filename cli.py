"""`edgellama` command line: each command parses its options and calls one library function.

Errors a user can fix print one line to stderr and exit non-zero; --debug shows the traceback.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from edgellama import __version__
from edgellama.runtime.errors import EdgeLlamaError

PROVIDERS = click.Choice(["cpu", "cuda"])
CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
EXIT_CODES = """\b
Exit codes: 0 done; 1 an error (a model file, the disk, the model itself); 2 a usage
error (an option or argument that cannot work); 130 interrupted (Ctrl-C)."""


def _friendly(fn):
    """Turn EdgeLlamaError (and Ctrl-C) into one line and an exit code."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = click.get_current_context().find_root().params.get("debug", False)
        try:
            return fn(*args, **kwargs)
        except EdgeLlamaError as exc:
            if debug:
                raise
            click.echo(f"error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted; nothing was left half-written", err=True)
            sys.exit(130)
        except OSError as exc:  # the file system said no: a permission, a vanished file, an I/O error
            if debug:
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            click.echo(f"error: {where}{exc.strerror or exc}; check the path, its permissions and the disk", err=True)
            sys.exit(1)

    return wrapper


class _Group(click.Group):
    """click's usage errors as one line (what was wrong, where to read more), exit code 2."""

    def main(self, *args, **kwargs):
        standalone = kwargs.pop("standalone_mode", True)
        if not standalone:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except click.UsageError as exc:
            hint = f"; see '{exc.ctx.command_path} -h'" if exc.ctx is not None else ""
            click.echo(f"error: {exc.format_message().rstrip('.')}{hint}", err=True)
            sys.exit(2)
        except click.ClickException as exc:
            click.echo(f"error: {exc.format_message()}", err=True)
            sys.exit(exc.exit_code)
        except click.exceptions.Abort:
            click.echo("interrupted; nothing was left half-written", err=True)
            sys.exit(130)
        sys.exit(rv if isinstance(rv, int) else 0)


def _given(name: str) -> bool:
    """Whether the user set option `name` (rather than it keeping its default)."""
    from click.core import ParameterSource

    source = click.get_current_context().get_parameter_source(name)
    return source not in (None, ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP)


def _refuse_unless(condition: bool, flags: dict[str, str], needs: str) -> None:
    """Refuse options that do nothing in this combination: {param name: flag} -> one line."""
    from edgellama.runtime.errors import BadArgumentError

    if condition:
        return
    given = [flag for name, flag in flags.items() if _given(name)]
    if given:
        raise BadArgumentError(f"{', '.join(given)} {'needs' if len(given) == 1 else 'need'} {needs}")


def _require_extra(extra: str, command: str, modules: tuple[str, ...]) -> None:
    """One line naming the install command where an optional extra is missing (the
    runtime-only install has none of them)."""
    import importlib.util

    from edgellama.runtime.errors import MissingExtraError, install_hint

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{command} needs {' and '.join(missing)}, which this install lacks: "
                                f"{install_hint(extra)}")


EXPORT_MODULES = ("onnx", "gguf")  # the export extra: graph writing, GGUF quant types


def _runtime_process() -> None:
    """For the commands that load a model and generate: the runtime does no BLAS work, but
    OpenBLAS (under numpy) starts a thread per core at import that spins for a while waiting
    for some, taking a core from onnxruntime while the model loads (session creation ~5 %
    slower on 2 cores). Set before numpy loads, and never over the user's own choice."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _must_exist(path: Path, what: str) -> None:
    """One line for a path that is not there, naming what to give instead."""
    from edgellama.runtime.errors import BadArgumentError

    if not path.exists():
        raise BadArgumentError(f"{path}: no such file or folder; give {what}")


def _notes_to_stderr() -> None:
    """The library's one-line notes (logger "edgellama": a stale partial folder removed, ...)
    go to stderr as `note: ...`."""
    import logging

    class ToStderr(logging.Handler):  # whatever sys.stderr is when the note is made
        def emit(self, record: logging.LogRecord) -> None:
            click.echo(f"note: {record.getMessage()}", err=True)

    log = logging.getLogger("edgellama")
    if not any(type(h).__name__ == "ToStderr" for h in log.handlers):
        log.addHandler(ToStderr())
        log.propagate = False


def _progress(label: str):
    from edgellama.progress import task_progress

    return task_progress(label)


# ---- sources: an exported folder, a bundle, a GGUF or a Hugging Face folder --------------------

SOURCE_HELP = ("MODEL is an exported folder, a bundle, a .gguf file or a Hugging Face folder; the last two "
               "are exported once into the cache (see `edgellama cache list`).")


def _sourced(fn):
    """Put SOURCE_HELP into a command's help where its docstring says {SOURCE}."""
    fn.__doc__ = (fn.__doc__ or "").replace("{SOURCE}", SOURCE_HELP)
    return fn


def _bits_option(fn):
    return click.option(
        "--bits", "source_bits", type=click.Choice(["auto", "4", "8", "float"]), default="auto", show_default=True,
        help="For a .gguf or Hugging Face MODEL: the precision of its cached export. auto = the GGUF's own "
             "(int4 for Q4 files), float for a Hugging Face folder.")(fn)


def _model_source(source: Path, bits: str = "auto", main_model: bool = True) -> Path:
    """The folder (or bundle) to load for SOURCE, exporting a GGUF / Hugging Face folder once
    into the cache."""
    from edgellama.exporter.cache import exported, needs_export

    _must_exist(source, "an exported model folder, a bundle, a .gguf file or a Hugging Face folder")
    if not needs_export(source):
        _refuse_unless(not main_model, {"source_bits": "--bits"},
                       "a .gguf or Hugging Face MODEL (this one is exported already; use `edgellama quantize`)")
        return source
    _require_extra("export", f"running {source.name}", EXPORT_MODULES)
    _notes_to_stderr()
    with _progress("exporting") as progress:
        return exported(source, {"auto": "auto", "float": None, "4": 4, "8": 8}[bits], progress,
                        notify=lambda line: click.echo(line, err=True))


# ---- speculation and sampling options ----------------------------------------------------------

def _speculation_options(fn):
    options = [
        click.option("--speculate", type=click.Choice(["off", "ngram", "draft"]), default="off", show_default=True,
                     help="Draft tokens and check them in one forward: ngram = prompt lookup (no second model), "
                          "draft = a smaller model (--draft-model). Greedy text is unchanged on float graphs."),
        click.option("--draft-model", type=click.Path(path_type=Path), default=None,
                     help="With --speculate draft: a model (folder, bundle, .gguf) with the same tokenizer."),
        click.option("--draft-tokens", type=click.IntRange(0, 16), default=8, show_default=True,
                     help="With --speculate: the most tokens drafted per forward (fewer while drafts keep "
                          "failing); 0 = plain decoding."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _speculation(kw: dict, provider: str, threads: int | None) -> dict:
    """speculate= / draft_tokens= for Model.generate, from --speculate, --draft-model, --draft-tokens."""
    from edgellama.runtime.errors import BadArgumentError

    mode, draft_dir = kw.pop("speculate"), kw.pop("draft_model")
    draft_tokens = kw.pop("draft_tokens")
    if (mode == "draft") != (draft_dir is not None):
        raise BadArgumentError("--speculate draft and --draft-model DIR go together; give both, or use "
                               "--speculate ngram (no second model)")
    _refuse_unless(mode != "off", {"draft_tokens": "--draft-tokens"}, "--speculate ngram or --speculate draft")
    if mode == "off":
        return {}
    if mode == "ngram":
        return {"speculate": "ngram", "draft_tokens": draft_tokens}
    from edgellama.runtime.model import Model
    from edgellama.runtime.speculate import Draft

    draft = Model.load(_model_source(draft_dir, main_model=False), provider=provider, threads=threads)
    return {"speculate": Draft(draft), "draft_tokens": draft_tokens}


@click.group(cls=_Group, context_settings=CONTEXT, epilog=EXIT_CODES)
@click.version_option(__version__, "-V", "--version", prog_name="edgellama")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Take a Llama-family model to a laptop or an edge device.

    \b
    Examples:
      edgellama run SmolLM2-135M-Instruct.Q4_1.gguf "What is the capital of Germany?"
      edgellama chat smollm2-int4
      edgellama export SmolLM2-135M-Instruct.Q4_1.gguf smollm2-int4 --bits 4
    """


def _quant_options(default_bits: str | None, presets: bool = False):
    """--bits and friends, shared by `export` (optional) and `quantize`; with `presets` the
    options a preset sets default to the preset's value (None here, filled by _quant)."""
    needs = " (with --bits)" if default_bits is None else ""
    from_preset = lambda value: None if presets else value  # noqa: E731
    shown = not presets
    by_preset = " Default: the --preset's." if presets else ""
    options = [
        click.option("--bits", type=click.Choice(["4", "8"]), default=default_bits, show_default=True,
                     help="Block-quantize weights (MatMulNBits)." if default_bits is None else
                          "Weight bits (MatMulNBits)."),
        click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default=from_preset("32"),
                     show_default=shown, help=f"Weights per quantization block{needs}.{by_preset}"),
        click.option("--symmetric/--asymmetric", default=False, show_default=True,
                     help=f"Asymmetric keeps a float minimum per block (exact on Q4_1/Q4_K grids){needs}."),
        click.option("--method", type=click.Choice(["rtn", "mse", "mse-zp", "gptq"]), default=from_preset("mse"),
                     show_default=shown,
                     help="rtn: round to nearest; mse: least-squares scale and float min per block (exact on "
                          "GGUF grids); mse-zp: least squares with integer zero points (fewer ops, faster); "
                          f"gptq: error-compensating GPTQ on the calibration text, integer zero points "
                          f"(quantize only){needs}.{by_preset}"),
        click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "4"]), default="4", show_default=True,
                     help=f"MatMulNBits compute: 4 = int8 activations (fast on CPU), 0 = float (slow on CPU){needs}."),
        click.option("--embeddings", type=click.Choice(["keep", "int8", "int4"]), default=from_preset("int8"),
                     show_default=shown, help=f"The embedding table: kept float, or block-quantized{needs}.{by_preset}"),
        click.option("--lm-head", type=click.Choice(["keep", "int8", "int4"]), default=from_preset("int8"),
                     show_default=shown,
                     help=f"The output projection: kept float, or block-quantized (a table tied to the embedding "
                          f"is stored once when both have the same bits){needs}.{by_preset}"),
    ]
    if presets:
        from edgellama.buildkit.quant_options import DEFAULT_PRESET, PRESETS

        options += [
            click.option("--preset", type=click.Choice(list(PRESETS)), default=DEFAULT_PRESET, show_default=True,
                         help="A measured size / speed / accuracy point (README: Presets): sets --block-size, "
                              "--method, --embeddings, --lm-head and how many projections get 8 bits; options "
                              "given explicitly win."),
            click.option("--size-budget", "size_budget", type=click.FloatRange(min=0, min_open=True), default=None,
                         metavar="MB", help="Largest folder to write (MB = 10^6 bytes): the projections whose "
                                            "4-bit fit loses most on the calibration text get 8 bits while it fits."),
        ]

    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


QUANT_FLAGS = {"block_size": "--block-size", "symmetric": "--symmetric/--asymmetric", "method": "--method",
               "accuracy_level": "--accuracy-level", "embeddings": "--embeddings", "lm_head": "--lm-head"}


def _quant(kw: dict, force: bool):
    """QuantOptions from the command's options; with --preset (quantize), the preset's values
    for the options not given."""
    from edgellama.buildkit.quant_options import QuantOptions

    given = dict(bits=int(kw["bits"]), symmetric=kw["symmetric"], accuracy_level=int(kw["accuracy_level"]),
                 force=force, calibrate=kw.get("calibrate", True), calibration=kw.get("calibration"),
                 calibration_tokens=kw.get("calibration_tokens") or 4096)
    for name, value in (("block_size", kw["block_size"]), ("method", kw["method"]),
                        ("embeddings", kw["embeddings"]), ("lm_head", kw["lm_head"])):
        if value is not None:
            given[name] = int(value) if name == "block_size" else value
    if kw.get("preset") is None:
        return QuantOptions(**given)
    return QuantOptions.from_preset(kw["preset"], size_budget_mb=kw.get("size_budget"), **given)


def _weights(manifest) -> str:
    """'int4 weights (block 32), fp32 activations' or 'fp32'."""
    q = manifest.quantization
    if not q:
        return manifest.dtype
    return f"int{q.get('bits')} weights (block {q.get('block_size')}), {manifest.dtype} activations"


@main.command(context_settings=CONTEXT)
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of weights, activations and KV cache.")
@click.option("--attention", type=click.Choice(["auto", "gqa", "standard"]), default="auto", show_default=True,
              help="auto: GroupQueryAttention where ONNX Runtime supports the shape, else standard ops.")
@click.option("--via", type=click.Choice(["native", "optimum"]), default="native", show_default=True,
              help="optimum: trace a Hugging Face folder with optimum (architectures beyond the Llama family).")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_quant_options(default_bits=None)
@_friendly
def export(source: Path, output_dir: Path, dtype: str, attention: str, via: str, force: bool, **kw) -> None:
    """Export SOURCE (a Hugging Face folder or a .gguf file) to an ONNX model folder.

    With --bits, weights are block-quantized as they stream (the float graph is never
    written); GGUF Q4_0 / Q4_1 / Q8_0 blocks are carried over exactly. With --via optimum
    and --bits, the traced float graph is quantized as `edgellama quantize` does.

    \b
    Examples:
      edgellama export SmolLM2-135M-Instruct.Q4_1.gguf smollm2-int4 --bits 4
      edgellama export ./Llama-3.2-1B-Instruct llama-fp16 --dtype fp16
    """
    _refuse_unless(kw["bits"] is not None, QUANT_FLAGS, "--bits 4 or --bits 8")
    _must_exist(source, "a .gguf file or a Hugging Face folder")
    _require_extra("export", "export", EXPORT_MODULES)
    _notes_to_stderr()
    from edgellama.exporter.export import ExportOptions, export as run_export

    quant = _quant(kw, force) if kw["bits"] else None
    options = ExportOptions(dtype=dtype, force=force, attention=attention, quant=quant, via=via)
    with _progress("exporting") as progress:
        manifest = run_export(source, output_dir, options, progress)
    click.echo(f"wrote {output_dir} ({manifest.architecture}, {manifest.num_layers} layers, "
               f"{_weights(manifest)}, attention={manifest.attention})", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_quant_options(default_bits="4", presets=True)
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A UTF-8 text to calibrate on (default: a text shipped with edgellama). mse / mse-zp weigh "
                   "each input column's error by its activations' mean square; gptq needs it.")
@click.option("--calibration-tokens", type=click.IntRange(min=64), default=4096, show_default=True,
              help="How many tokens of the calibration text to run.")
@click.option("--calibrate/--no-calibration", "calibrate", default=True, show_default=True,
              help="--no-calibration: weight-only fits, as `export --bits` does.")
@_friendly
def quantize(model_dir: Path, output_dir: Path, force: bool, **kw) -> None:
    """Quantize a float model folder from `edgellama export` to int4 / int8 (MatMulNBits).

    \b
    Examples:
      edgellama quantize smollm2-fp32 smollm2-int4
      edgellama quantize smollm2-fp32 smollm2-int4-b128 --block-size 128 --method mse-zp
    """
    # Whether these options calibrate, asked before --calibration itself is checked against them.
    calibrated = _quant({**kw, "calibration": None}, force).calibrated
    _refuse_unless(calibrated, {"calibration": "--calibration", "calibration_tokens": "--calibration-tokens"},
                   "calibration (--method mse, mse-zp or gptq, without --no-calibration)")
    options = _quant(kw, force)
    _must_exist(model_dir, "a float folder from `edgellama export`")
    _require_extra("export", "quantize", ("onnx",))
    _notes_to_stderr()
    from edgellama.quantize import quantize_folder

    with _progress("quantizing") as progress:
        manifest = quantize_folder(model_dir, output_dir, options, progress)
    q = manifest.quantization
    error = q.get("mean_relative_error")
    shown = f", mean relative weight error {error:.3g}" if isinstance(error, (int, float)) else ""
    preset = f"{q['preset']}: " if q.get("preset") else ""
    wider = f", {len(q['int8_projections'])} projections at int8" if q.get("int8_projections") else ""
    click.echo(f"wrote {output_dir} ({preset}int{q['bits']}, block {q['block_size']}, {q['scheme']}, "
               f"{q['quantized_weights']} weights{wider}{shown})", err=True)


@main.command(name="eval", context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False),
              help="A UTF-8 text to score.")
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Another model: also report mean KL divergence and top-1 agreement against it.")
@click.option("--window", type=click.IntRange(min=2), default=512, show_default=True,
              help="Tokens per scored window.")
@click.option("--stride", type=click.IntRange(min=1), default=None, help="Default: the window (non-overlapping).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: physical cores.")
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_bits_option
@_friendly
def eval_(model_dir: Path, text_file: Path, reference: Path | None, window: int, stride: int | None,
          threads: int | None, provider: str, as_json: bool, source_bits: str) -> None:
    """Perplexity of MODEL over a text (and KL / agreement against a reference).

    \b
    Examples:
      edgellama eval smollm2-int4 --text GPL-3.txt
      edgellama eval smollm2-int4 --text GPL-3.txt --reference smollm2-fp32
    """
    _runtime_process()
    import json

    from edgellama.runtime.model import Model
    from edgellama.tools.evaluate import evaluate

    model_folder = _model_source(model_dir, source_bits)
    ref_folder = _model_source(reference, main_model=False) if reference else None
    # Loaders, not models: evaluate scores one model, sets its logits aside and frees it before
    # loading the other, so two sessions are never resident at once, each in Model.load's
    # low-memory form.
    load = lambda folder: lambda: Model.load(folder, provider=provider, threads=threads, low_memory=True)  # noqa: E731
    with _progress("evaluating") as progress:
        result = evaluate(load(model_folder), text_file.read_text(encoding="utf-8"), window, stride,
                          load(ref_folder) if ref_folder else None, progress)
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens")
    if result.kl is not None:
        click.echo(f"KL {result.kl:.5f} nats/token, top-1 agreement {result.top1_agreement * 100:.2f} %")


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Prompt length (filler text).")
@click.option("--new-tokens", type=click.IntRange(min=1), default=128, show_default=True,
              help="Tokens generated per run.")
@click.option("--runs", type=click.IntRange(min=1), default=3, show_default=True, help="Timed runs (medians).")
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: physical cores.")
@click.option("--no-cold", is_flag=True, help="Skip the fresh-process time-to-first-token runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--prompt-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Use this text (encoded as is) as the prompt instead of --prompt-tokens of filler.")
@_speculation_options
@_bits_option
@_friendly
def bench(model_dir: Path, prompt_tokens: int, new_tokens: int, runs: int, provider: str,
          threads: int | None, no_cold: bool, as_json: bool, prompt_file: Path | None, source_bits: str,
          **kw) -> None:
    """Prefill / decode tok/s, time to first token, peak RSS and size of MODEL (and, with
    --speculate, tokens per forward and drafts accepted).

    \b
    Examples:
      edgellama bench smollm2-int4
      edgellama bench smollm2-int4 --prompt-file article.txt --speculate ngram --json
    """
    _runtime_process()
    _refuse_unless(prompt_file is None, {"prompt_tokens": "--prompt-tokens"}, "no --prompt-file (the file sets the prompt)")
    from edgellama.tools.bench import bench as run_bench
    from edgellama.tools.bench import format_result

    folder = _model_source(model_dir, source_bits)
    speculation = _speculation(kw, provider, threads)
    text = prompt_file.read_text(encoding="utf-8") if prompt_file is not None else None
    with _progress("benchmarking") as progress:
        result = run_bench(folder, prompt_tokens, new_tokens, runs, provider, threads, not no_cold, progress,
                           prompt_text=text, **speculation)
    click.echo(result.to_json() if as_json else format_result(result))


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@_friendly
def inspect(model_dir: Path) -> None:
    """Print a model folder's manifest and its graph's inputs and outputs.

    \b
    Example:
      edgellama inspect smollm2-int4
    """
    from edgellama.tools.report import describe

    _must_exist(model_dir, "a model folder or a bundle")
    click.echo(describe(model_dir))


SAMPLING_FLAGS = {"top_k": "--top-k", "top_p": "--top-p", "min_p": "--min-p", "seed": "--seed"}


def _generation_options(fn):
    options = [
        click.option("-n", "--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
                     help="The most tokens to generate per reply."),
        click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
                     help="0 = greedy."),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="Sample from the K likeliest tokens (0 = off)."),
        click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True,
                     help="Nucleus sampling: the likeliest tokens holding this much probability (1 = off)."),
        click.option("--min-p", type=click.FloatRange(0, 1, max_open=True), default=0.0, show_default=True,
                     help="Drop tokens less likely than this times the likeliest (0 = off)."),
        click.option("--repetition-penalty", type=click.FloatRange(1e-4, 1e4), default=1.0,
                     show_default=True, help="Divide the logits of tokens already seen (1 = off)."),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract from the logits of tokens already seen (0 = off)."),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True,
                     help="Subtract per occurrence of a token already seen (0 = off)."),
        click.option("--seed", type=click.IntRange(min=0), default=None, help="Seed sampling (with --temperature)."),
        click.option("--stop", multiple=True, help="Stop string (repeatable); not printed."),
        click.option("--provider", type=PROVIDERS, default="cpu", show_default=True),
        click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: physical cores."),
        click.option("--stats", is_flag=True,
                     help="Print prompt / decode speed and time to first token on stderr (always on a terminal)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return _bits_option(_speculation_options(fn))


def _constraint_options(fn):
    options = [
        click.option("--json-schema", "json_schema", type=click.Path(path_type=Path, exists=True, dir_okay=False),
                     default=None, help="Constrain the reply to JSON valid against the schema in FILE."),
        click.option("--json", "as_json", is_flag=True, help="Constrain the reply to one JSON object."),
        click.option("--grammar", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
                     help="Constrain the reply to the grammar in FILE (Lark as llguidance reads it, or "
                          "llama.cpp's GBNF)."),
        click.option("--regex", default=None, help="Constrain the reply to match this regular expression."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _constraint(kw: dict) -> dict:
    """constraint= for the config, from --json-schema / --json / --grammar / --regex."""
    from edgellama.runtime.errors import BadArgumentError

    schema, as_json, grammar, regex = (kw.pop(k, None) for k in ("json_schema", "as_json", "grammar", "regex"))
    given = [flag for flag, value in (("--json-schema", schema), ("--json", as_json or None), ("--grammar", grammar),
                                      ("--regex", regex)) if value is not None]
    if len(given) > 1:
        raise BadArgumentError(f"{' and '.join(given)} each constrain the reply; give one")
    if not given:
        return {}
    from edgellama.runtime.constrain import Grammar

    if schema is not None:
        text = schema.read_text(encoding="utf-8")
        try:
            return {"constraint": Grammar.json_schema(text)}
        except BadArgumentError as exc:
            raise BadArgumentError(f"{schema}: {exc}") from None
    if grammar is not None:
        try:
            return {"constraint": Grammar.lark(grammar.read_text(encoding="utf-8"))}
        except BadArgumentError as exc:
            raise BadArgumentError(f"{grammar}: {exc}") from None
    return {"constraint": Grammar.regex(regex) if regex is not None else Grammar.json()}


def _config(kw: dict, show_probs: int = 0, speculation: dict | None = None):
    import re

    from edgellama.runtime.errors import BadArgumentError
    from edgellama.runtime.model import make_config

    _refuse_unless(kw["temperature"] > 0, SAMPLING_FLAGS, "--temperature above 0 (0 is greedy)")
    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "seed", "stop")
    try:
        return make_config(show_probs=show_probs, **{k: kw[k] for k in keys}, **(speculation or {}),
                           **_constraint(kw))
    except BadArgumentError as exc:  # the runtime names its fields; a CLI user knows the flags
        names = "|".join(keys + ("show_probs",))
        message = re.sub(rf"\b({names})\b", lambda m: "--" + m.group(1).replace("_", "-"), str(exc))
        raise BadArgumentError(message.removeprefix("sampling: ")) from None


def _prompt_text(prompt: str | None, prompt_opt: str | None, prompt_file: Path | None) -> str:
    """The prompt from exactly one of: PROMPT, --prompt, -f FILE, stdin (PROMPT `-`, or piped)."""
    from edgellama.runtime.errors import BadArgumentError

    given = [name for name, value in (("PROMPT", prompt), ("--prompt", prompt_opt), ("-f/--file", prompt_file))
             if value is not None]
    if len(given) > 1:
        raise BadArgumentError(f"{' and '.join(given)} both give the prompt; use one")
    if prompt_file is not None:
        return prompt_file.read_text(encoding="utf-8")
    text = prompt if prompt is not None else prompt_opt
    if text == "-" or (text is None and not sys.stdin.isatty()):
        text = sys.stdin.read()
        if not text.strip():
            raise BadArgumentError("stdin held no prompt; pipe some text, or give PROMPT or -f FILE")
        return text
    if text is None:
        raise BadArgumentError('give a prompt: edgellama run MODEL "text", -f FILE, or pipe it on stdin')
    if not text:
        raise BadArgumentError("the prompt is empty; give some text")
    if " " not in text and Path(text).is_file():
        click.echo(f"note: the prompt is the text {text!r}; to read that file use -f {text}", err=True)
    return text


def _stats_wanted(stats: bool) -> bool:
    return stats or sys.stderr.isatty()


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.argument("prompt", required=False)
@click.option("-p", "--prompt", "prompt_opt", default=None, help="Prompt text (or give it as PROMPT).")
@click.option("-f", "--file", "prompt_file", type=click.Path(path_type=Path, exists=True, dir_okay=False),
              default=None, help="Read the prompt from FILE.")
@click.option("--raw", is_flag=True, help="Send the prompt as it is, without the model's chat template.")
@click.option("--chat", "as_chat", is_flag=True, hidden=True)  # the default now; kept for old scripts
@click.option("--system", default=None, help="System prompt (in the chat template).")
@click.option("--show-probs", type=click.IntRange(min=0), default=0,
              help="Print the top K next-token probabilities (stderr).")
@click.option("--probs-each-step", is_flag=True, help="With --show-probs: at every generated token too.")
@_constraint_options
@_generation_options
@_sourced
@_friendly
def run(model_dir: Path, prompt: str | None, prompt_opt: str | None, prompt_file: Path | None, raw: bool,
        as_chat: bool, system: str | None, show_probs: int, probs_each_step: bool, provider: str,
        threads: int | None, stats: bool, source_bits: str, **kw) -> None:
    """Generate a reply to a prompt; only the generated text goes to stdout.

    The prompt is wrapped in MODEL's chat template when it has one (--raw sends it as
    it is). It comes from PROMPT, -f FILE, or stdin (PROMPT `-`, or piped). {SOURCE}

    \b
    Examples:
      edgellama run SmolLM2-135M-Instruct.Q4_1.gguf "What is the capital of Germany?"
      edgellama run smollm2-int4 --raw "The best thing about AI is its ability to"
      cat notes.txt | edgellama run smollm2-int4 --system "Summarise the text." -n 128
      edgellama run smollm2-int4 "Invent a person who lives in Rome." --json-schema person.json
    """
    _runtime_process()
    from edgellama.runtime.errors import BadArgumentError
    from edgellama.runtime.model import Model
    from edgellama.tools.chat_repl import format_timings
    from edgellama.tools.report import format_probs

    _refuse_unless(show_probs > 0, {"probs_each_step": "--probs-each-step"}, "--show-probs K")
    _refuse_unless(not raw, {"system": "--system", "as_chat": "--chat"}, "the chat template (drop --raw)")
    text = _prompt_text(prompt, prompt_opt, prompt_file)
    folder = _model_source(model_dir, source_bits)
    config = _config(kw, show_probs, _speculation(kw, provider, threads))
    model = Model.load(folder, provider=provider, threads=threads)
    templated = not raw and model.chat_template is not None
    if (as_chat or system) and model.chat_template is None:
        raise BadArgumentError(f"{model_dir}: this model has no chat template, so {'--system' if system else '--chat'} "
                               "cannot apply; drop it")
    if templated:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        gen = model.generate(model.render_chat(messages), config)
    else:
        gen = model.generate(text, config)
    shown = False
    for step in gen:
        if not shown and show_probs:
            click.echo(format_probs(model, text, gen.prompt_top), err=True)
            shown = True
        elif probs_each_step and step.top:
            click.echo("\n" + format_probs(model, None, step.top), err=True)
        click.echo(step.text, nl=False)
        sys.stdout.flush()
    if show_probs and not shown and gen.prompt_top:
        click.echo(format_probs(model, text, gen.prompt_top), err=True)
    click.echo()
    if gen.completion_tokens == 0 or (gen.finish_reason == "eos" and not gen.text.strip()):
        hint = ("; for a plain completion of the text, try --raw" if templated
                else "; an instruct model may answer with its chat template (drop --raw)")
        click.echo(f"note: the model ended its reply at once (no text){hint}", err=True)
    elif gen.finish_reason == "length" and gen.completion_tokens < config.max_new_tokens:
        click.echo(f"note: the reply was cut at {gen.completion_tokens} tokens by the end of the model's "
                   f"{model.context_length}-token context", err=True)
    if _stats_wanted(stats):
        click.echo(format_timings(gen), err=True)


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@_constraint_options
@_generation_options
@_sourced
@_friendly
def chat(model_dir: Path, system: str | None, provider: str, threads: int | None, stats: bool, source_bits: str,
         **kw) -> None:
    """Chat with MODEL in the terminal; the KV cache is kept across turns.

    Type /help in the chat for its commands (/set, /save, /load, /reset, /exit); Ctrl-C
    stops a reply, Ctrl-D (or Ctrl-C at an empty prompt) exits; \"\"\" starts and ends a
    multi-line message. {SOURCE}

    \b
    Examples:
      edgellama chat SmolLM2-135M-Instruct.Q4_1.gguf
      edgellama chat smollm2-int4 --system "You are terse." --temperature 0.7 --seed 1
    """
    _runtime_process()
    from edgellama.runtime.model import Model
    from edgellama.tools.chat_repl import run_repl

    folder = _model_source(model_dir, source_bits)
    speculation = _speculation(kw, provider, threads)
    model = Model.load(folder, provider=provider, threads=threads)
    session = model.chat(system=system, config=_config(kw, speculation=speculation))
    run_repl(session, stats=True if stats else None)


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the server to the network (set --api-key).")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--name", default=None, help="The model's name in the API (default: the folder or file stem).")
@click.option("--api-key", envvar="EDGELLAMA_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on every route but /health (or set EDGELLAMA_API_KEY).")
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Default: physical cores.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=4, show_default=True,
              help="Generations run at once; more requests wait in a queue.")
@click.option("--cache-mb", type=click.IntRange(min=0), default=None,
              help="Prompt cache: KV of recent requests kept for reuse by later ones sharing a prefix "
                   "(chat turns, system prompts). Default: 4 full contexts' KV, at most 2048; 0 turns it off.")
@_speculation_options
@_bits_option
@_sourced
@_friendly
def serve(model_dir: Path, host: str, port: int, name: str | None, api_key: str | None, provider: str,
          threads: int | None, max_concurrent: int, cache_mb: int | None, source_bits: str, **kw) -> None:
    """Serve MODEL over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Needs Starlette and uvicorn (the serve extra). {SOURCE}

    \b
    Examples:
      edgellama serve smollm2-int4
      EDGELLAMA_API_KEY=secret edgellama serve smollm2-int4 --host 0.0.0.0 --name smollm2
    """
    _runtime_process()
    from edgellama.serve import check_api_key, default_model_id, exposure_warning, require_extra

    require_extra()
    if api_key is not None:
        check_api_key(api_key)
    from edgellama.runtime.model import Model
    from edgellama.serve.server import Server, bind

    warning = exposure_warning(host, api_key)
    sock = bind(host, port)  # a taken port fails before the model loads
    folder = _model_source(model_dir, source_bits)
    speculation = _speculation(kw, provider, threads)
    model = Model.load(folder, provider=provider, threads=threads)
    server = Server(model, sock, max_concurrent, model_id=name or default_model_id(model_dir),
                    cache_bytes=None if cache_mb is None else cache_mb * 2**20, speculation=speculation,
                    api_key=api_key)
    cache = server.engine.cache
    caching = f"prompt cache {cache.max_bytes / 2**20:.4g} MiB" if cache is not None else "no prompt cache"
    if warning:
        click.echo(warning, err=True)
    click.echo(f"serving {server.model_id} at {server.url}/v1 ({max_concurrent} at a time, {caching}"
               f"{', API key required' if api_key else ''}; Ctrl-C stops)", err=True)
    server.run()


# ---- deploy: compile, pack -------------------------------------------------------------------

@main.command(name="compile", context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["cpu", "cuda", "arm64"]), default="cpu", show_default=True,
              help="Where the artifact will run; it loads only there. arm64: ARM64 boards (Raspberry Pi 4 / 5), "
                   "prepared on any machine, ARM's int8 path as accurate as x86's; runs on x86 too.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="ort: ORT format for ONNX Runtime Mobile / minimal builds (+ required_operators.config).")
@click.option("--level", type=click.Choice(["basic", "extended", "all"]), default=None,
              help="onnxruntime graph optimization level to bake in. Default: all; extended for --target arm64 "
                   "(all is laid out for this machine's CPU).")
@click.option("--prepack/--no-prepack", default=None,
              help="Save weights in the CPU kernels' packed layout (cpu, onnx format): the fastest fp32 "
                   "load and packed weights in file-backed memory, at twice the size; the artifact runs only "
                   "on this CPU type and onnxruntime version. Default: on for float models, off for "
                   "quantized ones (int4 loads no faster prepacked: prefer --format ort).")
@click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "4"]), default=None,
              help="Set every MatMulNBits' compute: 4 = int8 activations (fast prefill), 1 = float (the float "
                   "graph's text; on ARM boards decode is bandwidth-bound either way, README: ARM64 boards). "
                   "Default: as the folder was made.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_friendly
def compile_(model_dir: Path, output_dir: Path, target: str, fmt: str, level: str, prepack: bool | None,
             accuracy_level: str | None, force: bool) -> None:
    """Optimize MODEL_DIR's graph offline for a device (or convert it to ORT format).

    \b
    Examples:
      edgellama compile smollm2-fp32 smollm2-fp32-compiled
      edgellama compile smollm2-int4 smollm2-int4-ort --format ort
      edgellama compile smollm2-int4 smollm2-int4-pi5 --target arm64 --accuracy-level 1
    """
    _refuse_unless(target == "cpu" and fmt == "onnx", {"prepack": "--prepack/--no-prepack"},
                   "--target cpu and --format onnx (prepacked weights exist only there)")
    _must_exist(model_dir, "a model folder from `edgellama export`")
    _notes_to_stderr()
    from edgellama.deploy.compile import CompileOptions, compile_folder

    with _progress("compiling") as progress:
        options = CompileOptions(target, fmt, level, prepack, force,
                                 None if accuracy_level is None else int(accuracy_level))
        manifest = compile_folder(model_dir, output_dir, options, progress)
    c = manifest.compiled
    accuracy = c.get("rewrites", {}).get("matmulnbits_accuracy_level")
    click.echo(f"wrote {output_dir} ({c['format']}, target {c['target']}, level {c['level']}, "
               f"onnxruntime {c['onnxruntime']}{', prepacked' if c['prepacked'] else ''}"
               f"{'' if accuracy is None else f', accuracy level {accuracy}'})", err=True)


@main.command(context_settings=CONTEXT)
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace BUNDLE if it exists.")
@_friendly
def pack(model_dir: Path, bundle: Path, force: bool) -> None:
    """Pack MODEL_DIR into one verified file (graph, weights, tokenizer, manifest, SHA256SUMS).

    run, chat, eval, bench, serve and Model.load accept the file where a folder is expected.

    \b
    Example:
      edgellama pack smollm2-int4 smollm2.edgellama
    """
    if not model_dir.is_dir():
        from edgellama.runtime.errors import BadArgumentError

        raise BadArgumentError(f"{model_dir}: no such folder; give a model folder from `edgellama export`")
    _notes_to_stderr()
    from edgellama.deploy.bundle import pack as run_pack

    digest = run_pack(model_dir, bundle, force)
    click.echo(f"wrote {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB); bundle digest "
               f"(SHA-256 of SHA256SUMS) {digest}", err=True)


# ---- the cache of exported sources --------------------------------------------------------------

@main.group(context_settings=CONTEXT)
def cache() -> None:
    """The exports made when run, chat, serve, bench or eval were given a .gguf file or a
    Hugging Face folder ($XDG_CACHE_HOME/edgellama, else ~/.cache/edgellama).

    \b
    Examples:
      edgellama cache list
      edgellama cache rm 3f2a91c0
    """


@cache.command(name="list", context_settings=CONTEXT)
@_friendly
def cache_list() -> None:
    """One line per cached export: ID, size, precision, last used, source."""
    import time

    from edgellama.exporter.cache import entries, models_root

    found = entries()
    if not found:
        click.echo(f"(no cached exports in {models_root()})", err=True)
        return
    click.echo(f"{'ID':16}  {'SIZE':>9}  {'WEIGHTS':7}  {'LAST USED':16}  SOURCE")
    for e in found:
        used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
        click.echo(f"{e.key:16}  {e.size / 2**20:7.1f}MB  {e.describe_options():7}  {used:16}  {e.source}")


@cache.command(name="rm", context_settings=CONTEXT)
@click.argument("selectors", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Remove every cached export.")
@_friendly
def cache_rm(selectors: tuple[str, ...], everything: bool) -> None:
    """Remove cached exports by ID (a prefix will do) or by source path."""
    from edgellama.exporter.cache import remove

    removed = remove(list(selectors), everything)
    freed = sum(e.size for e in removed) / 2**20
    click.echo(f"removed {len(removed)} cached export{'s' if len(removed) != 1 else ''} ({freed:.1f} MB)", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
