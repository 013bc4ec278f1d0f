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


def _require_extra(extra: str, command: str, modules: tuple[str, ...]) -> None:
    """One line naming the install command where an optional extra is missing (the
    runtime-only install has none of them)."""
    import importlib.util

    from edgellama.runtime.errors import MissingExtraError

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingExtraError(f"{command} needs {' and '.join(missing)}, which this install lacks: "
                                f"pip install 'edgellama[{extra}]'")


EXPORT_MODULES = ("onnx", "gguf")  # the export extra: graph writing, GGUF quant types


def _runtime_process() -> None:
    """For the commands that load a model and generate: the runtime does no BLAS work, but
    OpenBLAS (under numpy) starts a thread per core at import that spins for a while waiting
    for some, taking a core from onnxruntime while the model loads (session creation ~5 %
    slower on 2 cores). Set before numpy loads, and never over the user's own choice."""
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _speculation_options(fn):
    options = [
        click.option("--speculate", type=click.Choice(["off", "ngram", "draft"]), default="off", show_default=True,
                     help="Draft tokens and check them in one forward: ngram = prompt lookup (no second model), "
                          "draft = a smaller model (--draft-model). Greedy text is unchanged on float graphs."),
        click.option("--draft-model", type=click.Path(path_type=Path), default=None,
                     help="With --speculate draft: a model folder with the same tokenizer."),
        click.option("--draft-tokens", type=click.IntRange(0, 16), default=8, show_default=True,
                     help="The most tokens drafted per forward (fewer while drafts keep failing); 0 = plain decoding."),
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
    if mode == "off":
        return {}
    if mode == "ngram":
        return {"speculate": "ngram", "draft_tokens": draft_tokens}
    from edgellama.runtime.model import Model
    from edgellama.runtime.speculate import Draft

    return {"speculate": Draft(Model.load(draft_dir, provider=provider, threads=threads)), "draft_tokens": draft_tokens}


class _Bar:
    """A progress bar on stderr, fed (done, total, what) callbacks; silent unless stderr is a terminal."""

    def __init__(self, label: str):
        self.label, self.bar = label, None
        self.enabled = sys.stderr.isatty()

    def __call__(self, done: int, total: int, what: str) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = click.progressbar(length=total, label=self.label, file=sys.stderr, show_pos=True)
            self.bar.__enter__()
        self.bar.update(done - self.bar.pos)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)


@click.group()
@click.version_option(__version__, prog_name="edgellama")
@click.option("--debug", is_flag=True, help="Show tracebacks for errors.")
def main(debug: bool) -> None:
    """Take a Llama-family model to a laptop or an edge device."""


def _quant_options(default_bits: str | None):
    """--bits and friends, shared by `export` (optional) and `quantize`."""
    options = [
        click.option("--bits", type=click.Choice(["4", "8"]), default=default_bits, show_default=True,
                     help="Block-quantize weights (MatMulNBits)." if default_bits is None else None),
        click.option("--block-size", type=click.Choice(["16", "32", "64", "128", "256"]), default="32", show_default=True),
        click.option("--symmetric/--asymmetric", default=False, show_default=True,
                     help="Asymmetric keeps a float minimum per block (exact on Q4_1/Q4_K grids)."),
        click.option("--method", type=click.Choice(["rtn", "mse", "mse-zp", "gptq"]), default="mse", show_default=True,
                     help="rtn: round to nearest; mse: least-squares scale and float min per block (exact on "
                          "GGUF grids); mse-zp: least squares with integer zero points (fewer ops, faster); "
                          "gptq: error-compensating GPTQ on the calibration text, integer zero points "
                          "(quantize only)."),
        click.option("--accuracy-level", type=click.Choice(["0", "1", "2", "4"]), default="4", show_default=True,
                     help="MatMulNBits compute: 4 = int8 activations (fast on CPU), 0 = float (slow on CPU)."),
        click.option("--embeddings", type=click.Choice(["keep", "int8", "int4"]), default="int8", show_default=True),
        click.option("--lm-head", type=click.Choice(["keep", "int8", "int4"]), default="int8", show_default=True),
    ]

    def wrap(fn):
        for option in reversed(options):
            fn = option(fn)
        return fn

    return wrap


def _quant(kw: dict, force: bool):
    from edgellama.buildkit.quant_options import QuantOptions

    return QuantOptions(bits=int(kw["bits"]), block_size=int(kw["block_size"]), symmetric=kw["symmetric"],
                        method=kw["method"], accuracy_level=int(kw["accuracy_level"]),
                        embeddings=kw["embeddings"], lm_head=kw["lm_head"], force=force,
                        calibrate=kw.get("calibrate", True), calibration=kw.get("calibration"),
                        calibration_tokens=kw.get("calibration_tokens") or 4096)


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--dtype", type=click.Choice(["fp32", "fp16"]), default="fp32", show_default=True,
              help="Precision of weights, activations and KV cache.")
@click.option("--attention", type=click.Choice(["auto", "gqa", "standard"]), default="auto", show_default=True,
              help="auto: GroupQueryAttention where ONNX Runtime supports the shape, else standard ops.")
@click.option("--via", type=click.Choice(["native", "optimum"]), default="native", show_default=True,
              help="optimum: trace a Hugging Face folder with optimum (architectures beyond the Llama family; "
                   "pip install 'edgellama[optimum]').")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_quant_options(default_bits=None)
@_friendly
def export(source: Path, output_dir: Path, dtype: str, attention: str, via: str, force: bool, **kw) -> None:
    """Export SOURCE (a Hugging Face folder or a .gguf file) to an ONNX model folder.

    With --bits, weights are block-quantized as they stream (the float graph is never
    written); GGUF Q4_0 / Q4_1 / Q8_0 blocks are carried over exactly. With --via optimum
    and --bits, the traced float graph is quantized as `edgellama quantize` does."""
    _require_extra("export", "export", EXPORT_MODULES)
    from edgellama.exporter.export import ExportOptions, export as run_export

    quant = _quant(kw, force) if kw["bits"] else None
    bar = _Bar("exporting")
    try:
        options = ExportOptions(dtype=dtype, force=force, attention=attention, quant=quant, via=via)
        manifest = run_export(source, output_dir, options, bar)
    finally:
        bar.close()
    click.echo(f"wrote {output_dir} ({manifest.architecture}, {manifest.num_layers} layers, "
               f"{manifest.dtype}, attention={manifest.attention})", err=True)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_quant_options(default_bits="4")
@click.option("--calibration", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="A UTF-8 text to calibrate on (default: a text shipped with edgellama). mse / mse-zp weigh "
                   "each input column's error by its activations' mean square; gptq needs it.")
@click.option("--calibration-tokens", type=int, default=4096, show_default=True,
              help="How many tokens of the calibration text to run.")
@click.option("--calibrate/--no-calibration", "calibrate", default=True, show_default=True,
              help="--no-calibration: weight-only fits, as `export --bits` does.")
@_friendly
def quantize(model_dir: Path, output_dir: Path, force: bool, **kw) -> None:
    """Quantize a float model folder from `edgellama export` to int4 / int8 (MatMulNBits)."""
    _require_extra("export", "quantize", ("onnx",))
    from edgellama.quantize import quantize_folder

    bar = _Bar("quantizing")
    try:
        manifest = quantize_folder(model_dir, output_dir, _quant(kw, force), bar)
    finally:
        bar.close()
    q = manifest.quantization
    click.echo(f"wrote {output_dir} (int{kw['bits']}, block {kw['block_size']}, {q['scheme']}, "
               f"{q['quantized_weights']} weights, mean relative error {q['mean_relative_error']:.4f})", err=True)


@main.command(name="eval")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--text", "text_file", required=True, type=click.Path(path_type=Path, exists=True, dir_okay=False))
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Another model folder: also report mean KL divergence and top-1 agreement against it.")
@click.option("--window", type=int, default=512, show_default=True)
@click.option("--stride", type=int, default=None, help="Default: the window (non-overlapping).")
@click.option("--threads", type=int, default=None)
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_friendly
def eval_(model_dir: Path, text_file: Path, reference: Path | None, window: int, stride: int | None,
          threads: int | None, provider: str, as_json: bool) -> None:
    """Perplexity of MODEL_DIR over a text (and KL / agreement against a reference)."""
    _runtime_process()
    import json

    from edgellama.tools.evaluate import evaluate
    from edgellama.runtime.model import Model

    model = Model.load(model_dir, provider=provider, threads=threads)
    ref = Model.load(reference, provider=provider, threads=threads) if reference else None
    bar = _Bar("evaluating")
    try:
        result = evaluate(model, text_file.read_text(encoding="utf-8"), window, stride, ref, bar)
    finally:
        bar.close()
    if as_json:
        click.echo(json.dumps(result.to_dict()))
        return
    click.echo(f"perplexity {result.perplexity:.4f} over {result.tokens} tokens")
    if result.kl is not None:
        click.echo(f"KL {result.kl:.5f} nats/token, top-1 agreement {result.top1_agreement * 100:.2f} %")


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt-tokens", type=int, default=128, show_default=True)
@click.option("--new-tokens", type=int, default=128, show_default=True)
@click.option("--runs", type=int, default=3, show_default=True)
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--threads", type=int, default=None)
@click.option("--no-cold", is_flag=True, help="Skip the fresh-process time-to-first-token runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--prompt-file", type=click.Path(path_type=Path, exists=True, dir_okay=False), default=None,
              help="Use this text (encoded as is) as the prompt instead of --prompt-tokens of filler.")
@_speculation_options
@_friendly
def bench(model_dir: Path, prompt_tokens: int, new_tokens: int, runs: int, provider: str,
          threads: int | None, no_cold: bool, as_json: bool, prompt_file: Path | None, **kw) -> None:
    """Prefill / decode tok/s, time to first token, peak RSS and size of MODEL_DIR (and, with
    --speculate, tokens per forward and drafts accepted)."""
    _runtime_process()
    from edgellama.tools.bench import bench as run_bench
    from edgellama.tools.bench import format_result

    speculation = _speculation(kw, provider, threads)
    text = prompt_file.read_text(encoding="utf-8") if prompt_file is not None else None
    bar = _Bar("benchmarking")
    try:
        result = run_bench(model_dir, prompt_tokens, new_tokens, runs, provider, threads, not no_cold, bar,
                           prompt_text=text, **speculation)
    finally:
        bar.close()
    click.echo(result.to_json() if as_json else format_result(result))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@_friendly
def inspect(model_dir: Path) -> None:
    """Print a model folder's manifest and its graph's inputs and outputs."""
    from edgellama.tools.report import describe

    click.echo(describe(model_dir))


def _generation_options(fn):
    options = [
        click.option("--max-new-tokens", type=int, default=256, show_default=True),
        click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy."),
        click.option("--top-k", type=int, default=0, show_default=True, help="0 = off."),
        click.option("--top-p", type=float, default=1.0, show_default=True),
        click.option("--min-p", type=float, default=0.0, show_default=True),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True),
        click.option("--presence-penalty", type=float, default=0.0, show_default=True),
        click.option("--frequency-penalty", type=float, default=0.0, show_default=True),
        click.option("--seed", type=int, default=None),
        click.option("--stop", multiple=True, help="Stop string (repeatable); not printed."),
        click.option("--provider", type=PROVIDERS, default="cpu", show_default=True),
        click.option("--threads", type=int, default=None, help="Default: physical cores."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return _speculation_options(fn)


def _config(kw: dict, show_probs: int = 0, speculation: dict | None = None):
    from edgellama.runtime.model import make_config

    keys = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
            "presence_penalty", "frequency_penalty", "seed", "stop")
    return make_config(show_probs=show_probs, **{k: kw[k] for k in keys}, **(speculation or {}))


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--prompt", required=True, help="Prompt text.")
@click.option("--chat", "as_chat", is_flag=True, help="Wrap the prompt in the model's chat template.")
@click.option("--system", default=None, help="System prompt (with --chat).")
@click.option("--show-probs", type=int, default=0, help="Print the top K next-token probabilities (stderr).")
@click.option("--probs-each-step", is_flag=True, help="With --show-probs: at every generated token too.")
@_generation_options
@_friendly
def run(model_dir: Path, prompt: str, as_chat: bool, system: str | None, show_probs: int,
        probs_each_step: bool, provider: str, threads: int | None, **kw) -> None:
    """Generate from MODEL_DIR; only the generated text goes to stdout."""
    _runtime_process()
    from edgellama.runtime.model import Model
    from edgellama.tools.report import format_probs

    config = _config(kw, show_probs, _speculation(kw, provider, threads))
    model = Model.load(model_dir, provider=provider, threads=threads)
    if as_chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        gen = model.generate(model.render_chat(messages), config)
    else:
        gen = model.generate(prompt, config)
    for i, step in enumerate(gen):
        if i == 0 and show_probs:
            click.echo(format_probs(model, prompt, gen.prompt_top), err=True)
        elif probs_each_step and step.top:
            click.echo("\n" + format_probs(model, None, step.top), err=True)
        click.echo(step.text, nl=False)
        sys.stdout.flush()
    click.echo()


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt.")
@_generation_options
@_friendly
def chat(model_dir: Path, system: str | None, provider: str, threads: int | None, **kw) -> None:
    """Interactive multi-turn chat (reads stdin; /reset, /exit). The KV cache is reused across turns."""
    _runtime_process()
    from edgellama.runtime.model import Model

    speculation = _speculation(kw, provider, threads)
    model = Model.load(model_dir, provider=provider, threads=threads)
    session = model.chat(system=system, config=_config(kw, speculation=speculation))
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            click.echo(">>> ", nl=False, err=True)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            session.reset()
            click.echo("(conversation reset)", err=True)
            continue
        if not text.strip():
            continue
        for step in session.stream(text):
            click.echo(step.text, nl=False)
            sys.stdout.flush()
        click.echo()


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on; 0.0.0.0 opens the server to the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True)
@click.option("--provider", type=PROVIDERS, default="cpu", show_default=True)
@click.option("--threads", type=int, default=None, help="Default: physical cores.")
@click.option("--max-concurrent", type=click.IntRange(min=1), default=4, show_default=True,
              help="Generations run at once; more requests wait in a queue.")
@click.option("--cache-mb", type=click.IntRange(min=0), default=None,
              help="Prompt cache: KV of recent requests kept for reuse by later ones sharing a prefix "
                   "(chat turns, system prompts). Default: 4 full contexts' KV, at most 2048; 0 turns it off.")
@_speculation_options
@_friendly
def serve(model_dir: Path, host: str, port: int, provider: str, threads: int | None, max_concurrent: int,
          cache_mb: int | None, **kw) -> None:
    """Serve MODEL_DIR over OpenAI's HTTP API (/v1/chat/completions, /v1/completions, /v1/models).

    Needs the serve extra: pip install 'edgellama[serve]'."""
    _runtime_process()
    from edgellama.serve import require_extra

    require_extra()
    from edgellama.runtime.model import Model
    from edgellama.serve.server import Server, bind

    sock = bind(host, port)  # a taken port fails before the model loads
    speculation = _speculation(kw, provider, threads)
    model = Model.load(model_dir, provider=provider, threads=threads)
    server = Server(model, sock, max_concurrent, cache_bytes=None if cache_mb is None else cache_mb * 2**20,
                    speculation=speculation)
    cache = server.engine.cache
    caching = f"prompt cache {cache.max_bytes / 2**20:.4g} MiB" if cache is not None else "no prompt cache"
    click.echo(f"serving {server.model_id} at {server.url}/v1 ({max_concurrent} at a time, {caching}; "
               "Ctrl-C stops)", err=True)
    server.run()


# ---- deploy: compile, pack -------------------------------------------------------------------

@main.command(name="compile")
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("output_dir", type=click.Path(path_type=Path))
@click.option("--target", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="The provider the artifact will run on; it loads only there.")
@click.option("--format", "fmt", type=click.Choice(["onnx", "ort"]), default="onnx", show_default=True,
              help="ort: ORT format for ONNX Runtime Mobile / minimal builds (+ required_operators.config).")
@click.option("--level", type=click.Choice(["basic", "extended", "all"]), default="all", show_default=True,
              help="onnxruntime graph optimization level to bake in.")
@click.option("--prepack/--no-prepack", default=True, show_default=True,
              help="Save weights in the CPU kernels' packed layout (cpu, onnx format): the fastest fp32 "
                   "load and packed weights in file-backed memory, at twice the size (int4 loads no faster: "
                   "prefer --format ort); the artifact runs only on this CPU type and onnxruntime version.")
@click.option("--force", is_flag=True, help="Replace OUTPUT_DIR if it exists.")
@_friendly
def compile_(model_dir: Path, output_dir: Path, target: str, fmt: str, level: str, prepack: bool, force: bool) -> None:
    """Optimize MODEL_DIR's graph offline for a device (or convert it to ORT format)."""
    from edgellama.deploy.compile import CompileOptions, compile_folder

    manifest = compile_folder(model_dir, output_dir, CompileOptions(target, fmt, level, prepack, force))
    c = manifest.compiled
    click.echo(f"wrote {output_dir} ({c['format']}, target {c['target']}, level {c['level']}, "
               f"onnxruntime {c['onnxruntime']}{', prepacked' if c['prepacked'] else ''})", err=True)


@main.command()
@click.argument("model_dir", type=click.Path(path_type=Path))
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace BUNDLE if it exists.")
@_friendly
def pack(model_dir: Path, bundle: Path, force: bool) -> None:
    """Pack MODEL_DIR into one verified file (graph, weights, tokenizer, manifest, SHA256SUMS).

    run, chat, eval, bench and Model.load accept the file where a folder is expected."""
    from edgellama.deploy.bundle import pack as run_pack

    digest = run_pack(model_dir, bundle, force)
    click.echo(f"wrote {bundle} ({bundle.stat().st_size / 2**20:.1f} MiB); bundle digest "
               f"(SHA-256 of SHA256SUMS) {digest}", err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
