"""`edgellama compile` and `edgellama pack`: compiled artifacts give the source's greedy
tokens, and what the runtime refuses (wrong target, onnxruntime, CPU; damaged bundles)."""

from __future__ import annotations

import hashlib
import json
import stat
import struct
import tempfile
import zipfile
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

from conftest import PROMPT_IDS, make_tiny
from edgellama.buildkit.quant_options import QuantOptions
from edgellama.cli import main
from edgellama.deploy import compile as compile_mod
from edgellama.deploy.bundle import ALIGN, pack
from edgellama.deploy.compile import CompileOptions, compile_folder
from edgellama.exporter.export import ExportOptions, export
from edgellama.quantize.rewrite import quantize_folder
from edgellama.runtime import artifact
from edgellama.runtime.bundle import parse_sums, unpacking
from edgellama.runtime.errors import BadArgumentError, BadModelFileError, OutputExistsError
from edgellama.runtime.model import Model

TINY_PROMPT = [5, 17, 42, 99, 7, 250, 31]
VARIANTS = {  # name: CompileOptions
    "onnx-basic": CompileOptions(level="basic"),
    "onnx-extended": CompileOptions(level="extended"),
    "onnx-all": CompileOptions(level="all"),
    "onnx-all-noprepack": CompileOptions(level="all", prepack=False),
    "ort-all": CompileOptions(format="ort", level="all"),
    "ort-basic": CompileOptions(format="ort", level="basic"),
}


def greedy(folder, prompt, n: int) -> list[int]:
    model = Model.load(folder, threads=2)
    return [s.token_id for s in model.generate(prompt, max_new_tokens=n, ignore_eos=True)]


_SOURCE_TOKENS: dict[tuple, list[int]] = {}


def source_greedy(folder, prompt, n: int) -> list[int]:
    """Greedy tokens of an uncompiled folder, computed once per test session."""
    key = (str(folder), tuple(prompt), n)
    if key not in _SOURCE_TOKENS:
        _SOURCE_TOKENS[key] = greedy(folder, prompt, n)
    return _SOURCE_TOKENS[key]


def ops_of(folder: Path) -> set[str]:
    compiled = json.loads((folder / "edgellama.json").read_text())["compiled"]
    if compiled["format"] == "ort":  # the operator config lists what the ORT file uses
        lines = (folder / "required_operators.config").read_text().splitlines()
        return {op for line in lines if not line.startswith("#") for op in line.split(";")[2].split(",")}
    return {n.op_type for n in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.node}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    """fp32 (GroupQueryAttention) and int4 (MatMulNBits, int8 activations) tiny folders."""
    root = tmp_path_factory.mktemp("deploy")
    make_tiny(root / "hf")
    export(root / "hf", root / "fp32")
    quantize_folder(root / "fp32", root / "int4", QuantOptions(bits=4))
    return root


# ---- compile: same tokens ----------------------------------------------------------------------

@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_compiled_tiny_model_gives_the_source_greedy_tokens(tiny, weights, variant):
    out = tiny / f"{weights}-{variant}"
    manifest = compile_folder(tiny / weights, out, VARIANTS[variant])
    assert greedy(out, TINY_PROMPT, 24) == source_greedy(tiny / weights, TINY_PROMPT, 24)
    rec = manifest.compiled
    assert (rec["format"], rec["level"], rec["target"]) == (VARIANTS[variant].format, VARIANTS[variant].level, "cpu")
    assert rec["onnxruntime"] == ort.__version__
    # prepacked by default for float weights only (a prepacked int4 graph is ~1.8x the size, no faster)
    assert rec["prepacked"] == (variant in ("onnx-basic", "onnx-extended", "onnx-all") and weights == "fp32")
    ops = ops_of(out)
    assert "GroupQueryAttention" in ops  # the fused attention survives optimization and conversion
    assert ("MatMulNBits" in ops) == (weights == "int4")
    if variant.startswith("ort"):
        assert not (out / "model.onnx").exists() and (out / "required_operators_and_types.config").is_file()


def test_all_level_fuses_norms_and_drops_nothing_the_runtime_needs(tiny):
    out = tiny / "fp32-fused"
    compile_folder(tiny / "fp32", out, CompileOptions(prepack=False))
    assert "SkipSimplifiedLayerNormalization" in ops_of(out)
    m = Model.load(out)
    assert m.graph_io.has_logits_to_keep == Model.load(tiny / "fp32").graph_io.has_logits_to_keep
    assert (out / "tokenizer.json").read_bytes() == (tiny / "fp32" / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def smollm2_int4(smollm2_gguf, module_tmp) -> Path:
    out = module_tmp / "int4"
    export(smollm2_gguf, out, ExportOptions(quant=QuantOptions(bits=4)))  # the exact Q4_1 import
    return out


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["fp32", "int4"])
@pytest.mark.parametrize("variant", ["onnx-all", "ort-all"])
def test_compiled_smollm2_gives_the_source_greedy_tokens(smollm2_onnx, smollm2_int4, tmp_path, weights, variant):
    src = smollm2_onnx if weights == "fp32" else smollm2_int4
    compile_folder(src, tmp_path / "c", VARIANTS[variant])
    assert greedy(tmp_path / "c", PROMPT_IDS, 32) == source_greedy(src, PROMPT_IDS, 32)


# ---- compile: refusals ------------------------------------------------------------------------

def _edit_compiled(folder: Path, **changes) -> None:
    path = folder / "edgellama.json"
    manifest = json.loads(path.read_text())
    manifest["compiled"].update(changes)
    path.write_text(json.dumps(manifest))


@pytest.fixture
def compiled(tiny, tmp_path) -> Path:
    out = tmp_path / "c"
    compile_folder(tiny / "fp32", out)
    return out


def test_wrong_target_is_refused(tiny, compiled, tmp_path):
    with pytest.raises(BadArgumentError, match="compiled for target 'cpu' but loaded with provider 'cuda'"):
        Model.load(compiled, provider="cuda")
    # A cuda artifact (basic rewrites only where CUDA is absent) does not load on cpu.
    compile_folder(tiny / "fp32", tmp_path / "cuda", CompileOptions(target="cuda", level="basic"))
    with pytest.raises(BadArgumentError, match="compiled for target 'cuda' but loaded with provider 'cpu'"):
        Model.load(tmp_path / "cuda", provider="cpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here")
def test_cuda_levels_beyond_basic_need_cuda(tiny, tmp_path):
    r = CliRunner().invoke(main, ["compile", str(tiny / "fp32"), str(tmp_path / "c"), "--target", "cuda"])
    assert r.exit_code == 2 and "needs onnxruntime-gpu with CUDA" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "c").exists()


def test_onnxruntime_version_rule(compiled):
    major, minor, patch = ort.__version__.split(".")[:3]
    _edit_compiled(compiled, onnxruntime=f"{major}.{int(minor) + 1}.0")
    with pytest.raises(BadModelFileError, match=rf"compiled with onnxruntime {major}\.{int(minor) + 1}\.0, running"):
        Model.load(compiled)
    _edit_compiled(compiled, onnxruntime=f"{major}.{minor}.{int(patch) + 1}")  # prepacked: exactly the same
    with pytest.raises(BadModelFileError, match="needs exactly that version"):
        Model.load(compiled)
    _edit_compiled(compiled, prepacked=False, level="extended")  # not prepacked: same minor is enough
    Model.load(compiled)


def test_another_cpu_is_refused(compiled):
    here = artifact.cpu_fingerprint()
    _edit_compiled(compiled, cpu={"machine": here["machine"], "isa": here["isa"] + ["amx_fp64_imaginary"]})
    with pytest.raises(BadModelFileError, match="compiled for another CPU .*lacks"):
        Model.load(compiled)
    _edit_compiled(compiled, cpu={"machine": "riscv64", "isa": []})
    with pytest.raises(BadModelFileError, match="compiled for another CPU"):
        Model.load(compiled)


def test_malformed_record_and_recompiling_are_refused(compiled, tmp_path):
    with pytest.raises(BadArgumentError, match="already compiled"):
        compile_folder(compiled, tmp_path / "again")
    _edit_compiled(compiled, format="tflite")
    with pytest.raises(BadModelFileError, match="'compiled' record is incomplete or unknown"):
        Model.load(compiled)


def test_ort_format_size_limit_is_checked_first(tiny, tmp_path, monkeypatch):
    monkeypatch.setattr(compile_mod, "ORT_FORMAT_MAX_BYTES", 1000)
    with pytest.raises(BadArgumentError, match="do not fit an ORT format file"):
        compile_folder(tiny / "fp32", tmp_path / "c", CompileOptions(format="ort"))
    assert not (tmp_path / "c").exists() and not list(tmp_path.iterdir())


def test_cli_compile_then_run_prints_the_same_text(tiny, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["compile", str(tiny / "int4"), str(tmp_path / "c"), "--format", "ort"])
    assert r.exit_code == 0, r.output
    assert "ort, target cpu, level all" in r.stderr
    args = ["--prompt", "The quick brown fox", "--max-new-tokens", "12", "--threads", "2"]
    a = runner.invoke(main, ["run", str(tiny / "int4"), *args])
    b = runner.invoke(main, ["run", str(tmp_path / "c"), *args])
    assert a.exit_code == b.exit_code == 0 and a.stdout == b.stdout and a.stdout.strip()
    r = runner.invoke(main, ["compile", str(tiny / "int4"), str(tmp_path / "c")])
    assert r.exit_code != 0 and "already exists" in r.stderr


# ---- bundles ----------------------------------------------------------------------------------

@pytest.fixture
def bundle(compiled, tmp_path) -> Path:
    path = tmp_path / "model.edgellama"
    pack(compiled, path)
    return path


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def test_bundle_round_trips(compiled, bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    with zipfile.ZipFile(bundle) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        sums = parse_sums(zf.read("SHA256SUMS").decode())
    files = {p.name for p in compiled.iterdir()}
    assert set(infos) == files | {"SHA256SUMS"} and set(sums) == files
    for name in files:
        assert sums[name] == hashlib.sha256((compiled / name).read_bytes()).hexdigest()
        assert infos[name].compress_type == zipfile.ZIP_STORED
        assert _data_offset(bundle, infos[name]) % ALIGN == 0, name
    assert greedy(bundle, TINY_PROMPT, 16) == greedy(compiled, TINY_PROMPT, 16)
    assert not list((tmp_path / "scratch").iterdir())  # the unpacked copy is gone
    assert Model.load(bundle).folder == bundle


def test_bundle_works_with_run_eval_and_bench(bundle, compiled, tmp_path):
    runner = CliRunner()
    args = ["--prompt", "The quick brown fox", "--max-new-tokens", "8", "--threads", "2"]
    a, b = runner.invoke(main, ["run", str(bundle), *args]), runner.invoke(main, ["run", str(compiled), *args])
    assert a.exit_code == 0 and a.stdout == b.stdout
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)
    a = runner.invoke(main, ["eval", str(bundle), "--text", str(text), "--window", "16", "--json"])
    b = runner.invoke(main, ["eval", str(compiled), "--text", str(text), "--window", "16", "--json"])
    assert a.exit_code == 0 and json.loads(a.stdout)["perplexity"] == json.loads(b.stdout)["perplexity"]
    r = runner.invoke(main, ["bench", str(bundle), "--prompt-tokens", "8", "--new-tokens", "4", "--runs", "1",
                             "--no-cold", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["size_mb"] == pytest.approx(bundle.stat().st_size / 2**20)


def test_flipped_byte_in_weights_is_caught(bundle):
    with zipfile.ZipFile(bundle) as zf:
        info = zf.getinfo("model.onnx.data")
    data = bytearray(bundle.read_bytes())
    data[_data_offset(bundle, info) + info.file_size // 2] ^= 0x01
    bundle.write_bytes(bytes(data))
    with pytest.raises(BadModelFileError, match="model.onnx.data is corrupted or was modified"):
        Model.load(bundle)
    r = CliRunner().invoke(main, ["run", str(bundle), "--prompt", "hi"])
    assert r.exit_code == 1 and "model.onnx.data is corrupted" in r.stderr and "Traceback" not in r.output


def test_bundle_weights_are_read_in_place(tiny, tmp_path):
    """An onnx-format bundle's weight data is not copied out: the graph is pointed at where
    the data lies inside the bundle (prepacked-weight entries included) and gives the same
    tokens; the data is still hashed, in place."""
    folder = tmp_path / "int4-c"
    compile_folder(tiny / "int4", folder, CompileOptions(prepack=True))  # entries carry 'prepacked_N' spans too
    bundle = tmp_path / "m.edgellama"
    pack(folder, bundle)
    with unpacking(bundle) as opened:
        assert opened.graph is not None and opened.data_folder == bundle.resolve().parent
        assert not (opened.folder / "model.onnx.data").exists()
        moved = onnx.load_from_string(opened.graph)
        with zipfile.ZipFile(bundle) as zf:
            start = _data_offset(bundle, zf.getinfo("model.onnx.data"))
        entries = [{e.key: e.value for e in t.external_data} for t in moved.graph.initializer if t.external_data]
        assert entries and all(e["location"] == bundle.name for e in entries)
        assert all(int(e["offset"]) >= start for e in entries)
        prepacked = [v for e in entries for k, v in e.items() if k.startswith("prepacked_")]
        assert prepacked and all(int(v.split("|")[1].split(";")[0]) >= start for v in prepacked)
        opened.check()
    assert greedy(bundle, TINY_PROMPT, 16) == greedy(folder, TINY_PROMPT, 16)


def test_bundle_graph_pointing_elsewhere_falls_back_to_copying(tiny, tmp_path):
    """A graph whose entries cannot be moved into the bundle (another file, a span past the
    data) is loaded the old way: the data copied out, then checked like any folder."""
    folder = tmp_path / "f"
    folder.mkdir()
    for f in (tiny / "fp32").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    graph = onnx.load(folder / "model.onnx", load_external_data=False)
    tensor = next(t for t in graph.graph.initializer if t.external_data)
    for e in tensor.external_data:
        if e.key == "offset":
            e.value = str(10**12)  # past the end of model.onnx.data
    onnx.save(graph, folder / "model.onnx")
    bundle = tmp_path / "b.edgellama"
    pack(folder, bundle)
    with unpacking(bundle) as opened:
        assert opened.graph is None and (opened.folder / "model.onnx.data").is_file()
    with pytest.raises(BadModelFileError, match="truncated"):
        Model.load(bundle)  # the checksums match: the graph itself is wrong, and says so


@pytest.fixture
def chunked(compiled, tmp_path) -> Path:
    """A bundle whose weight data also has per-4 KiB SHA-256s (SHA256CHUNKS)."""
    path = tmp_path / "chunked.edgellama"
    pack(compiled, path, chunk_bytes=4096)
    return path


def test_chunked_checksums_cover_the_weights_and_load(compiled, chunked):
    with zipfile.ZipFile(chunked) as zf:
        sums = parse_sums(zf.read("SHA256SUMS").decode())
        record = json.loads(zf.read("SHA256CHUNKS"))
    data = (compiled / "model.onnx.data").read_bytes()
    assert sums["SHA256CHUNKS"] == hashlib.sha256(json.dumps(record, indent=1).encode()).hexdigest()
    assert record["chunk_bytes"] == 4096 and len(record["files"]["model.onnx.data"]) == -(-len(data) // 4096) > 2
    assert record["files"]["model.onnx.data"] == [hashlib.sha256(data[i:i + 4096]).hexdigest()
                                                  for i in range(0, len(data), 4096)]
    with unpacking(chunked) as opened:
        assert not (opened.folder / "SHA256CHUNKS").exists()  # read, checked, not unpacked
        opened.check()
    assert greedy(chunked, TINY_PROMPT, 16) == greedy(compiled, TINY_PROMPT, 16)


def test_chunked_bundle_catches_a_flipped_byte(chunked):
    with zipfile.ZipFile(chunked) as zf:
        info = zf.getinfo("model.onnx.data")
    data = bytearray(chunked.read_bytes())
    data[_data_offset(chunked, info) + info.file_size - 5] ^= 0x01  # in the last, partial stretch
    chunked.write_bytes(bytes(data))
    with pytest.raises(BadModelFileError, match="model.onnx.data is corrupted or was modified"):
        Model.load(chunked)


def test_chunk_list_is_checked_like_any_file(chunked, tmp_path):
    with zipfile.ZipFile(chunked) as zf:
        record = json.loads(zf.read("SHA256CHUNKS"))
        sums = zf.read("SHA256SUMS").decode()
    record["files"]["model.onnx.data"][0] = "0" * 64
    out = tmp_path / "tampered.edgellama"
    _rewrite(chunked, out, {"SHA256CHUNKS": json.dumps(record).encode()})
    with pytest.raises(BadModelFileError, match="SHA256CHUNKS is corrupted or was modified"):
        Model.load(out)
    # Re-packed by hand with matching SHA256SUMS but a list that misses a stretch: refused.
    record["files"]["model.onnx.data"] = record["files"]["model.onnx.data"][1:]
    short = json.dumps(record).encode()
    lines = [ln for ln in sums.splitlines() if not ln.endswith("  SHA256CHUNKS")]
    lines.append(f"{hashlib.sha256(short).hexdigest()}  SHA256CHUNKS")
    _rewrite(chunked, out, {"SHA256CHUNKS": short, "SHA256SUMS": ("\n".join(lines) + "\n").encode()})
    with pytest.raises(BadModelFileError, match="SHA256CHUNKS does not cover model.onnx.data"):
        Model.load(out)


def test_a_folder_file_named_like_the_chunk_list_is_refused(compiled, tmp_path):
    (compiled / "SHA256CHUNKS").write_text("{}")
    with pytest.raises(BadArgumentError, match="cannot go into a bundle"):
        pack(compiled, tmp_path / "x.edgellama")
    assert not list(tmp_path.glob("x.edgellama*"))


def test_weights_that_break_the_session_build_are_named_as_corrupted(bundle, tmp_path):
    """The weight data is hashed beside the session build; when the damage makes the build
    itself fail (here: data cut short), the error is still the checksum's."""
    out = tmp_path / "short.edgellama"
    with zipfile.ZipFile(bundle) as zf:
        data = zf.read("model.onnx.data")
    _rewrite(bundle, out, {"model.onnx.data": data[: len(data) // 2]})
    with pytest.raises(BadModelFileError, match="model.onnx.data is corrupted or was modified"):
        Model.load(out)


def _rewrite(bundle: Path, out: Path, change: dict[str, bytes | None], extra: dict[str, bytes] = {},
             compress: bool = False) -> None:
    """A copy of `bundle` with entries replaced (CRC valid) or dropped, and others added."""
    with zipfile.ZipFile(bundle) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = change.get(info.filename, src.read(info))
            if data is not None:
                dst.writestr(info.filename, data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        for name, data in extra.items():
            dst.writestr(name, data)


def test_tampered_file_with_valid_crc_is_caught(bundle, tmp_path):
    out = tmp_path / "tampered.edgellama"
    _rewrite(bundle, out, {"tokenizer_config.json": b'{"chat_template": "{{ evil }}"}'})
    with pytest.raises(BadModelFileError, match="tokenizer_config.json is corrupted or was modified"):
        Model.load(out)


def test_path_traversal_entry_is_refused(bundle, tmp_path):
    out = tmp_path / "nested" / "evil.edgellama"
    out.parent.mkdir()
    payload = b"pwned"
    sums = (zipfile.ZipFile(bundle).read("SHA256SUMS").decode()
            + f"{hashlib.sha256(payload).hexdigest()}  ../evil.txt\n").encode()
    _rewrite(bundle, out, {"SHA256SUMS": sums}, extra={"../evil.txt": payload})
    with pytest.raises(BadModelFileError, match="malformed|not a plain file name"):
        Model.load(out)
    _rewrite(bundle, out, {}, extra={"../evil.txt": payload})  # unlisted too
    with pytest.raises(BadModelFileError, match=r"'\.\./evil\.txt' is not a plain file name"):
        Model.load(out)
    assert not (tmp_path / "evil.txt").exists() and not (tmp_path / "nested" / "evil.txt").exists()


@pytest.mark.parametrize("how, message", [
    ("unlisted", "is not listed in SHA256SUMS"),
    ("missing", "listed in SHA256SUMS but missing"),
    ("compressed", "is compressed"),
    ("no-sums", "no SHA256SUMS inside"),
    ("symlink", "is not a regular file"),
    ("not-zip", "not a model folder nor an edgellama bundle"),
])
def test_malformed_bundles_are_refused(bundle, tmp_path, how, message):
    out = tmp_path / "bad.edgellama"
    if how == "unlisted":
        _rewrite(bundle, out, {}, extra={"notes.txt": b"hello"})
    elif how == "missing":
        _rewrite(bundle, out, {"chat_template.jinja": None, "tokenizer_config.json": None})
    elif how == "compressed":
        _rewrite(bundle, out, {}, compress=True)
    elif how == "no-sums":
        _rewrite(bundle, out, {"SHA256SUMS": None})
    elif how == "symlink":
        _rewrite(bundle, out, {"chat_template.jinja": None})
        with zipfile.ZipFile(out, "a") as zf:
            link = zipfile.ZipInfo("chat_template.jinja")
            link.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(link, "/etc/passwd")
    else:
        out.write_bytes(b"just some text\n")
    with pytest.raises(BadModelFileError, match=message):
        Model.load(out)


def test_pack_refusals_write_nothing(tiny, compiled, tmp_path):
    target = tmp_path / "m.edgellama"
    with pytest.raises(BadModelFileError, match="no edgellama.json"):
        pack(tiny / "hf", target)
    assert not target.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".m.edgellama")]
    pack(compiled, target)
    with pytest.raises(OutputExistsError):
        pack(compiled, target)
    first = target.read_bytes()
    pack(compiled, target, force=True)
    assert target.read_bytes() == first  # deterministic
    r = CliRunner().invoke(main, ["pack", str(compiled), str(tmp_path / "cli.edgellama")])
    assert r.exit_code == 0 and "bundle digest" in r.stderr
    digest = hashlib.sha256(zipfile.ZipFile(tmp_path / "cli.edgellama").read("SHA256SUMS")).hexdigest()
    assert digest in r.stderr


def test_inspect_reads_compiled_folders_and_bundles(tiny, bundle, tmp_path):
    runner = CliRunner()
    r = runner.invoke(main, ["inspect", str(bundle)])
    assert r.exit_code == 0 and "every file matches SHA256SUMS" in r.output and '"prepacked": true' in r.output
    assert "GroupQueryAttention" not in r.output and "past_key_values.1.value" in r.output
    compile_folder(tiny / "int4", tmp_path / "ort", CompileOptions(format="ort"))
    r = runner.invoke(main, ["inspect", str(tmp_path / "ort")])
    assert r.exit_code == 0 and "ORT format" in r.output and "MatMulNBits" in r.output
