"""`edgellama bench --json` on a tiny model prints sane fields (smoke tier)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from edgellama.cli import main
from edgellama.exporter.export import export


def test_bench_json_on_tiny_model(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    export(folder, tmp_path / "m")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m"), "--prompt-tokens", "16", "--new-tokens", "8",
                                  "--runs", "2", "--threads", "1", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    for key in ("prefill_tok_s", "decode_tok_s", "ttft_warm_s", "ttft_cold_s", "load_s"):
        stat = data[key]
        assert 0 < stat["min"] <= stat["median"] <= stat["max"], key
    assert data["prompt_tokens"] == 16 and data["new_tokens"] == 8 and data["runs"] == 2
    assert data["peak_rss_mb"] > 10 and 0 < data["size_mb"] < 50
    assert data["ttft_cold_s"]["median"] > data["ttft_warm_s"]["median"]


def test_bench_reports_the_threads_the_session_used(tiny_factory, tmp_path):
    from edgellama.runtime.session import default_threads

    folder, _ = tiny_factory()
    export(folder, tmp_path / "m")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m"), "--prompt-tokens", "8", "--new-tokens", "4",
                                  "--runs", "1", "--no-cold", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["threads"] == default_threads()


def test_bench_rejects_bad_counts(tiny_factory, tmp_path):
    folder, _ = tiny_factory()
    export(folder, tmp_path / "m")
    r = CliRunner().invoke(main, ["bench", str(tmp_path / "m"), "--new-tokens", "1"])
    assert r.exit_code != 0 and "--new-tokens" in r.output
