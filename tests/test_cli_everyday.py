"""The everyday CLI: any source runs directly (export cache), prompts from an argument, a
file or stdin, the chat template by default, timings, refused no-op options, honest
messages and exit codes (2 = usage, 1 = other errors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgellama.cli import main
from tests.conftest import make_tiny

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("everyday") / "hf"
    make_tiny(folder)
    return folder


@pytest.fixture(scope="module")
def onnx_dir(hf_dir) -> Path:
    from edgellama.exporter.export import export

    out = hf_dir.parent / "onnx"
    export(hf_dir, out)
    return out


@pytest.fixture
def cache_home(tmp_path, monkeypatch) -> Path:
    home = tmp_path / "xdg-cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(home))
    return home


def invoke(*args, input=None):
    return CliRunner().invoke(main, [str(a) for a in args], input=input)


# ---- 1. any source runs directly --------------------------------------------------------

def test_hf_folder_runs_directly_through_the_cache(hf_dir, onnx_dir, cache_home):
    first = invoke("run", hf_dir, "--raw", "The quick brown", "-n", "4")
    assert first.exit_code == 0, first.output + first.stderr
    assert "exporting hf (fp32) once into" in first.stderr
    again = invoke("run", hf_dir, "--raw", "The quick brown", "-n", "4")
    assert again.exit_code == 0 and "exporting" not in again.stderr
    direct = invoke("run", onnx_dir, "--raw", "The quick brown", "-n", "4")
    assert first.stdout == again.stdout == direct.stdout  # the cached export is the plain export

    listed = invoke("cache", "list")
    assert listed.exit_code == 0
    rows = listed.stdout.strip().splitlines()[1:]
    assert len(rows) == 1 and str(hf_dir.resolve()) in rows[0] and "fp32" in rows[0]
    key = rows[0].split()[0]

    int8 = invoke("run", hf_dir, "--raw", "The quick brown", "-n", "2", "--bits", "8")
    assert int8.exit_code == 0 and "(int8)" in int8.stderr
    assert len(invoke("cache", "list").stdout.strip().splitlines()) == 3  # header + two entries

    removed = invoke("cache", "rm", key[:8])
    assert removed.exit_code == 0 and "removed 1 cached export" in removed.stderr
    assert invoke("cache", "rm", "--all").exit_code == 0
    assert "no cached exports" in invoke("cache", "list").stderr
    nothing = invoke("cache", "rm", "ffffffff")
    assert nothing.exit_code == 2 and "no cache entry matches" in nothing.stderr


def test_an_edited_source_is_exported_again(tmp_path, cache_home):
    src = tmp_path / "hf"
    make_tiny(src)
    assert "exporting" in invoke("run", src, "--raw", "fox", "-n", "1").stderr
    cfg = src / "config.json"
    cfg.write_text(cfg.read_text())  # same bytes, a new modification time: the key changes
    os.utime(cfg, ns=(cfg.stat().st_atime_ns, cfg.stat().st_mtime_ns + 10**9))
    assert "exporting" in invoke("run", src, "--raw", "fox", "-n", "1").stderr


@pytest.mark.slow
def test_two_concurrent_first_runs_share_one_entry(hf_dir, tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "edgellama.cli", "run", str(hf_dir), "--raw", "The quick brown", "-n", "4"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert outs[0][0] == outs[1][0]
    entries = [p for p in (tmp_path / "cache" / "edgellama" / "models").iterdir() if p.is_dir()]
    assert len(entries) == 1
    assert sorted(f.name for f in entries[0].iterdir()) == ["entry.json", "model"]
    assert not list((tmp_path / "cache").rglob("*.partial"))
    assert sum("exporting" in err for _, err in outs) == 1  # the second waited and reused it


def test_bits_on_an_exported_folder_is_refused(onnx_dir):
    r = invoke("run", onnx_dir, "fox", "--bits", "4")
    assert r.exit_code == 2 and "--bits needs a .gguf or Hugging Face MODEL" in r.stderr


def test_a_missing_path_is_called_missing(tmp_path):
    for cmd in (["run", tmp_path / "nope", "hi"], ["chat", tmp_path / "nope"], ["eval", tmp_path / "nope", "--text", __file__],
                ["export", tmp_path / "nope.gguf", tmp_path / "out"], ["inspect", tmp_path / "nope"]):
        r = invoke(*cmd)
        assert r.exit_code == 2, (cmd, r.stderr)
        assert "no such file or folder" in r.stderr or "no such folder" in r.stderr, r.stderr
        assert r.stderr.count("\n") == 1


# ---- 2. prompt input ----------------------------------------------------------------------

def test_prompt_from_argument_option_file_and_stdin(onnx_dir, tmp_path):
    want = invoke("run", onnx_dir, "--raw", "The quick brown", "-n", "4")
    assert want.exit_code == 0
    (tmp_path / "p.txt").write_text("The quick brown", encoding="utf-8")
    for args, stdin in ((["--prompt", "The quick brown"], None), (["-f", tmp_path / "p.txt"], None),
                        (["-"], "The quick brown"), ([], "The quick brown"), (["--prompt", "-"], "The quick brown")):
        r = invoke("run", onnx_dir, "--raw", "-n", "4", *args, input=stdin)
        assert r.exit_code == 0 and r.stdout == want.stdout, (args, r.stderr)
    both = invoke("run", onnx_dir, "fox", "--prompt", "dog")
    assert both.exit_code == 2 and "PROMPT and --prompt both give the prompt" in both.stderr
    empty = invoke("run", onnx_dir, input="")
    assert empty.exit_code == 2 and "stdin held no prompt" in empty.stderr


def test_a_prompt_that_names_a_file_gets_a_note(onnx_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("prompt.txt").write_text("The quick brown")
    r = invoke("run", onnx_dir, "--raw", "prompt.txt", "-n", "1")
    assert r.exit_code == 0 and "to read that file use -f prompt.txt" in r.stderr


# ---- 3. the chat template by default ----------------------------------------------------------

def test_run_applies_the_chat_template_unless_raw(onnx_dir):
    from edgellama.runtime.model import Model

    model = Model.load(onnx_dir)
    templated = model.generate_text(model.render_chat([{"role": "system", "content": "Be brief."},
                                                       {"role": "user", "content": "fox"}]), max_new_tokens=6)
    plain = model.generate_text("fox", max_new_tokens=6)
    assert templated != plain
    r = invoke("run", onnx_dir, "fox", "--system", "Be brief.", "-n", "6")
    assert r.exit_code == 0 and r.stdout == templated + "\n"
    raw = invoke("run", onnx_dir, "fox", "--raw", "-n", "6")
    assert raw.exit_code == 0 and raw.stdout == plain + "\n"


# ---- 5. timings ---------------------------------------------------------------------------------

def test_stats_line(onnx_dir):
    r = invoke("run", onnx_dir, "fox", "-n", "5", "--stats")
    assert r.exit_code == 0
    line = r.stderr.strip().splitlines()[-1]
    assert "tok/s" in line and "first token" in line, line
    quiet = invoke("run", onnx_dir, "fox", "-n", "5")
    assert "tok/s" not in quiet.stderr  # not a terminal, no --stats


# ---- 6. no silent no-ops ------------------------------------------------------------------------

@pytest.mark.parametrize("args, message", [
    (["export", "SRC", "OUT", "--method", "mse-zp"], "--method needs --bits 4 or --bits 8"),
    (["export", "SRC", "OUT", "--block-size", "128", "--lm-head", "int4"],
     "--block-size, --lm-head need --bits 4 or --bits 8"),
    (["run", "ONNX", "fox", "--raw", "--system", "x"], "--system needs the chat template (drop --raw)"),
    (["run", "ONNX", "fox", "--probs-each-step"], "--probs-each-step needs --show-probs K"),
    (["run", "ONNX", "fox", "--top-k", "5"], "--top-k needs --temperature above 0"),
    (["run", "ONNX", "fox", "--seed", "3"], "--seed needs --temperature above 0"),
    (["run", "ONNX", "fox", "--draft-tokens", "4"], "--draft-tokens needs --speculate"),
    (["bench", "ONNX", "--prompt-file", "FILE", "--prompt-tokens", "64"], "--prompt-tokens needs no --prompt-file"),
    (["quantize", "ONNX", "OUT", "--no-calibration", "--calibration-tokens", "128"], "--calibration-tokens needs calibration"),
    (["quantize", "ONNX", "OUT", "--method", "rtn", "--calibration", "FILE"], "--calibration needs calibration"),
    (["compile", "ONNX", "OUT", "--format", "ort", "--prepack"], "--prepack/--no-prepack needs --target cpu and --format onnx"),
])
def test_options_that_would_do_nothing_are_refused(args, message, hf_dir, onnx_dir, tmp_path):
    swap = {"SRC": hf_dir, "ONNX": onnx_dir, "OUT": tmp_path / "out", "FILE": __file__}
    r = invoke(*[swap.get(a, a) for a in args])
    assert r.exit_code == 2, r.output + r.stderr
    assert message in r.stderr and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "out").exists()


# ---- 8. messages and exit codes -------------------------------------------------------------------

def test_option_errors_name_the_flag_in_one_line(onnx_dir):
    for args, flag in ((["--temperature", "-1"], "--temperature"), (["-n", "0"], "--max-new-tokens"),
                       (["--top-p", "0"], "--top-p"), (["--threads", "0"], "--threads")):
        r = invoke("run", onnx_dir, "fox", *args)
        assert r.exit_code == 2 and flag in r.stderr and r.stderr.count("\n") == 1, r.stderr
    r = invoke("run", onnx_dir, "fox", "--bogus")
    assert r.exit_code == 2 and "No such option '--bogus'" in r.stderr and "run -h" in r.stderr


def test_runtime_errors_use_flag_names():
    from edgellama.cli import _config

    kw = dict(max_new_tokens=4, temperature=0.5, top_k=0, top_p=1.0, min_p=0.0, repetition_penalty=1.0,
              presence_penalty=float("nan"), frequency_penalty=0.0, seed=None, stop=())
    from edgellama.runtime.errors import BadArgumentError

    with main.make_context("edgellama", ["run", "x"], resilient_parsing=True) as ctx, ctx:  # for _given()
        with pytest.raises(BadArgumentError, match=r"^--presence-penalty is nan; give a finite number$"):
            _config(kw)


def test_dash_h_and_examples_on_every_command():
    commands = ["export", "quantize", "eval", "bench", "inspect", "run", "chat", "serve", "compile", "pack",
                "cache", "cache list", "cache rm"]
    top = invoke("-h")
    assert top.exit_code == 0 and "Examples:" in top.stdout and "Exit codes" in top.stdout
    for cmd in commands:
        r = invoke(*cmd.split(), "-h")
        assert r.exit_code == 0, cmd
        if cmd not in ("cache list", "cache rm"):
            assert "Example" in r.stdout, cmd
        options = [line for line in r.stdout.splitlines() if line.strip().startswith("--")]
        for line in options:  # every option explains itself (its help text follows on the line)
            assert len(line.split("  ")) > 1 or line.strip().startswith(("--help", "-h")), (cmd, line)


def test_show_probs_keeps_leading_spaces(onnx_dir):
    r = invoke("run", onnx_dir, "The quick", "--raw", "--show-probs", "5", "-n", "1")
    assert r.exit_code == 0
    line = r.stderr.splitlines()[0]
    assert line.startswith("The quick → \"")
    shown = [part.rsplit(" ", 2)[0] for part in line.split(" → ", 1)[1].split(", ")]
    assert len(set(shown)) == len(shown) == 5 and all(s.startswith('"') and s.endswith('"') for s in shown)


def test_int4_export_summary_says_int4(hf_dir, tmp_path):
    r = invoke("export", hf_dir, tmp_path / "q", "--bits", "4")
    assert r.exit_code == 0, r.stderr
    assert "int4 weights (block 32), fp32 activations" in r.stderr and ", fp32," not in r.stderr


# ---- 10. partial folders left by a killed writer --------------------------------------------------

def test_a_killed_writers_partial_folder_is_removed(hf_dir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.{dead.pid}-0badc0de.partial"
    (stale / "junk").mkdir(parents=True)
    alive = tmp_path / f".out.{os.getpid()}-feedf00d.partial"  # a writer still running: kept
    alive.mkdir()
    r = invoke("export", hf_dir, tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert not stale.exists() and alive.exists()
    assert f"note: removed {stale}" in r.stderr
    assert json.loads((tmp_path / "out" / "edgellama.json").read_text())["num_layers"] == 2


def test_a_bundles_errors_name_the_bundle(onnx_dir, tmp_path):
    import shutil

    from edgellama.deploy.bundle import pack

    broken = tmp_path / "broken"
    shutil.copytree(onnx_dir, broken)
    (broken / "tokenizer.json").write_text("{not json", encoding="utf-8")
    pack(broken, tmp_path / "b.edgellama")
    r = invoke("run", tmp_path / "b.edgellama", "fox")
    assert r.exit_code == 1 and r.stderr.count("\n") == 1, r.stderr
    assert f"{tmp_path / 'b.edgellama'}/tokenizer.json: malformed tokenizer" in r.stderr
    assert "edgellama-bundle-" not in r.stderr


@pytest.mark.slow
def test_the_real_gguf_runs_directly_and_answers(smollm2_gguf, cache_home):
    """The quick start: a GGUF runs as it is (exported once, int4 from its Q4_1 blocks), the
    chat template makes the instruct model answer, --raw shows why it is the default."""
    r = invoke("run", smollm2_gguf, "What is the capital of Germany?", "-n", "24", "--threads", "2", "--stats")
    assert r.exit_code == 0, r.stderr
    assert "Berlin" in r.stdout
    assert "(int4) once into" in r.stderr and "tok/s" in r.stderr.splitlines()[-1]
    raw = invoke("run", smollm2_gguf, "--raw", "What is the capital of Germany?", "-n", "24", "--threads", "2")
    assert raw.exit_code == 0 and raw.stdout == "\n" and "exporting" not in raw.stderr
    assert "the model ended its reply at once (no text)" in raw.stderr
    completion = invoke("run", smollm2_gguf, "--raw", "The best thing about AI is its ability to", "-n", "8")
    assert completion.exit_code == 0 and len(completion.stdout.split()) >= 4
