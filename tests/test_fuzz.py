"""Fuzzing the untrusted-file readers: only the tool's own clean errors, never a crash,
a hang or a huge allocation (bounded number of cases)."""

from __future__ import annotations

import json
import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import small_gguf
from edgellama.exporter.sources import GGUFFile, read_safetensors_header
from edgellama.runtime.errors import EdgeLlamaError

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def test_small_gguf_parses(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(small_gguf())
    gf = GGUFFile(path)
    assert gf.metadata["general.architecture"] == "llama" and gf.tensors["w"].shape == (4,)


@FUZZ
@given(st.data())
def test_mutated_gguf_gives_clean_errors(tmp_path, data):
    blob = bytearray(small_gguf())
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(bytes(blob[:cut]))
    try:
        GGUFFile(path).close()
    except EdgeLlamaError:
        pass


@FUZZ
@given(st.binary(max_size=200))
def test_random_bytes_after_gguf_magic(tmp_path, tail):
    path = tmp_path / "rand.gguf"
    path.write_bytes(b"GGUF" + tail)
    with pytest.raises(EdgeLlamaError):
        GGUFFile(path)


def _safetensors(header: dict, data: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@FUZZ
@given(st.data())
def test_lying_safetensors_headers_give_clean_errors(tmp_path, data):
    big = st.integers(0, 2**64 - 1)
    header = {
        "a": {"dtype": data.draw(st.sampled_from(["F32", "F16", "BF16", "I64", "X9", ""])),
              "shape": data.draw(st.lists(st.one_of(st.integers(0, 64), big), max_size=4)),
              "data_offsets": data.draw(st.lists(st.one_of(st.integers(0, 64), big), min_size=0, max_size=3))},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [data.draw(st.integers(0, 16)), data.draw(st.integers(0, 24))]},
    }
    blob = _safetensors(header, b"\0" * data.draw(st.integers(0, 32)))
    if data.draw(st.booleans()):
        blob = struct.pack("<Q", data.draw(big)) + blob[8:]
    path = tmp_path / "fuzz.safetensors"
    path.write_bytes(blob)
    try:
        refs = read_safetensors_header(path)
    except EdgeLlamaError:
        return
    size = len(blob)
    for ref in refs.values():  # whatever is accepted lies inside the file
        assert 0 <= ref.start <= ref.end <= size


# ---- absurd sizes: a clean error before any allocation ---------------------------------------

def _string(b: bytes) -> bytes:
    return struct.pack("<Q", len(b)) + b


def _gguf_kv(kv: bytes, n_kv: int = 1, n_tensors: int = 0) -> bytes:
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n_kv) + kv + b"\0" * 64


ABSURD_GGUF = {
    "metadata-count-2^62": lambda: _gguf_kv(b"", n_kv=2**62),
    "key-length-2^62": lambda: _gguf_kv(struct.pack("<Q", 2**62)),
    "string-value-2^62": lambda: _gguf_kv(_string(b"k") + struct.pack("<IQ", 8, 2**62)),
    "u64-array-2^60": lambda: _gguf_kv(_string(b"k") + struct.pack("<IIQ", 9, 10, 2**60)),
    "string-array-2^40": lambda: _gguf_kv(_string(b"k") + struct.pack("<IIQ", 9, 8, 2**40)),
    "nested-array-2^40": lambda: _gguf_kv(_string(b"k") + struct.pack("<IIQ", 9, 9, 2**40)),
    "tensor-rank-2^31": lambda: small_gguf(dims=()).replace(_string(b"w") + struct.pack("<I", 0),
                                                             _string(b"w") + struct.pack("<I", 2**31)),
    "tensor-dims-2^40": lambda: small_gguf(dims=(2**40, 2**40)),
    # 8 M one-byte elements really in the file: as a Python list, 64 MB; refused by the element cap.
    "array-elements-over-cap": lambda: _gguf_kv(_string(b"k") + struct.pack("<IIQ", 9, 0, (1 << 23) + 1)
                                                + b"\1" * ((1 << 23) + 1)),
}


def _safetensors_raw(n: int, header: bytes) -> bytes:
    return struct.pack("<Q", n) + header


ABSURD_SAFETENSORS = {
    "header-length-2^63": lambda: _safetensors_raw(2**63, b"{}"),
    "tensor-shape-2^40": lambda: _safetensors({"a": {"dtype": "F32", "shape": [2**40, 2**40], "data_offsets": [0, 16]}},
                                              b"\0" * 16),
    "tensor-offsets-2^62": lambda: _safetensors({"a": {"dtype": "U8", "shape": [2**62], "data_offsets": [0, 2**62]}},
                                                b"\0" * 16),
    "dtype-a-list": lambda: _safetensors({"a": {"dtype": ["F32"], "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 16),
}


def _peak_bytes(fn) -> int:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


@pytest.mark.parametrize("name", list(ABSURD_GGUF))
def test_absurd_gguf_sizes_allocate_nothing(tmp_path, name):
    path = tmp_path / "absurd.gguf"
    path.write_bytes(ABSURD_GGUF[name]())

    def parse():
        with pytest.raises(EdgeLlamaError):
            GGUFFile(path)

    assert _peak_bytes(parse) < 16 * 2**20


@pytest.mark.parametrize("name", list(ABSURD_SAFETENSORS))
def test_absurd_safetensors_sizes_allocate_nothing(tmp_path, name):
    path = tmp_path / "absurd.safetensors"
    path.write_bytes(ABSURD_SAFETENSORS[name]())

    def parse():
        with pytest.raises(EdgeLlamaError):
            read_safetensors_header(path)

    assert _peak_bytes(parse) < 16 * 2**20


def test_header_over_the_format_cap_is_not_read(tmp_path):
    """A 150 MB header in a (sparse) 200 MB file: refused by the 100 MB cap without reading it."""
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", 150 * 2**20))
        f.truncate(200 * 2**20)

    def parse():
        with pytest.raises(EdgeLlamaError, match="at most"):
            read_safetensors_header(path)

    assert _peak_bytes(parse) < 16 * 2**20


@pytest.mark.parametrize("key, value", [("hidden_size", 2**40), ("intermediate_size", 2**40), ("vocab_size", 2**40),
                                        ("head_dim", 2**40), ("num_hidden_layers", 2**40),
                                        ("max_position_embeddings", 2**40)])
def test_absurd_config_dimensions_allocate_nothing(tiny_factory, tmp_path, key, value):
    """Config dimensions are checked against the weights' headers (and the context against a cap)
    before the rope tables or any buffer is sized from them."""
    from edgellama.exporter.export import export

    folder, _ = tiny_factory()
    cfg = json.loads((folder / "config.json").read_text())
    cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))

    def run():
        with pytest.raises(EdgeLlamaError):
            export(folder, tmp_path / "out")

    assert _peak_bytes(run) < 64 * 2**20
    assert not (tmp_path / "out").exists()


# ---- lying values in configs and metadata: clean errors, never a TypeError -----------------

JUNK = ["x", [], {}, None, -1, 0, 1.5, 10**30, True, [1, 2], {"a": 1}, float("nan"), 2**63]


def test_junk_config_values_give_clean_errors(tiny_factory):
    from edgellama.exporter.config import ModelConfig

    folder, _ = tiny_factory()
    base = json.loads((folder / "config.json").read_text())
    mistral = {**base, "architectures": ["MistralForCausalLM"], "sliding_window": 16, "rope_theta": 5e5,
               "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
    mistral.pop("rope_parameters")
    for cfg in (base, mistral):
        for key in list(cfg) + ["head_dim", "sliding_window", "rope_scaling"]:
            for junk in JUNK:
                variants = [{**cfg, key: junk}]
                if key == "rope_scaling" and isinstance(cfg.get(key), dict):
                    variants += [{**cfg, key: {**cfg[key], k: junk}} for k in ("factor", "rope_type", "low_freq_factor")]
                for variant in variants:
                    try:
                        ModelConfig.from_hf(variant, "config.json")
                    except EdgeLlamaError:
                        pass


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_junk_gguf_metadata_gives_clean_errors(smollm2_metadata, data):
    from edgellama.exporter.config import ModelConfig
    from edgellama.exporter.tokenizer_gguf import tokenizer_from_gguf

    meta, names = smollm2_metadata.meta, smollm2_metadata.names
    key = data.draw(st.sampled_from(sorted(meta) + ["llama.vocab_size", "llama.rope.scaling.type",
                                                    "tokenizer.ggml.padding_token_id"]))
    junk = data.draw(st.sampled_from(JUNK))
    variant = {**meta, key: junk}
    try:
        ModelConfig.from_gguf(variant, names, "x.gguf")
        if key.startswith("tokenizer."):
            tokenizer_from_gguf(variant)
    except EdgeLlamaError:
        pass


class _Metadata:
    def __init__(self, meta: dict, names: set[str]):
        self.meta, self.names = meta, names

    def __repr__(self) -> str:  # hypothesis prints the arguments of a failing example
        return "<SmolLM2 GGUF metadata>"


@pytest.fixture(scope="module")
def smollm2_metadata(smollm2_gguf):
    gf = GGUFFile(smollm2_gguf)
    meta = _Metadata(dict(gf.metadata), set(gf.tensors))
    gf.close()
    return meta


@FUZZ
@given(st.data())
def test_relocating_mutated_graphs_gives_clean_errors(tiny_graph_bytes, data):
    """The external-data rewriter reads the same untrusted protobuf as the checker: a
    mutated or cut graph gives BadModelFileError or bytes, never a crash; an unchanged
    graph round-trips byte for byte."""
    from edgellama.runtime.external_data import relocate

    assert relocate(tiny_graph_bytes, lambda e: e) == tiny_graph_bytes
    blob = bytearray(tiny_graph_bytes)
    for _ in range(data.draw(st.integers(1, 6))):
        i = data.draw(st.integers(0, len(blob) - 1))
        blob[i] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(1, len(blob)))
    try:
        out = relocate(bytes(blob[:cut]), lambda e: {k: v + "x" for k, v in e.items()})
        assert isinstance(out, bytes)
    except EdgeLlamaError:
        pass


@pytest.fixture(scope="module")
def tiny_graph_bytes(tmp_path_factory) -> bytes:
    from conftest import make_tiny
    from edgellama.exporter.export import export

    root = tmp_path_factory.mktemp("graph")
    make_tiny(root / "hf")
    export(root / "hf", root / "m")
    return (root / "m" / "model.onnx").read_bytes()
