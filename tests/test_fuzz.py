"""Fuzzing the untrusted-file readers: only the tool's own clean errors, never a crash,
a hang or a huge allocation (bounded number of cases)."""

from __future__ import annotations

import json
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edgellama.exporter.sources import GGUFFile, read_safetensors_header
from edgellama.runtime.errors import EdgeLlamaError

FUZZ = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _small_gguf() -> bytes:
    """A valid GGUF v3: two metadata entries and one F32 tensor of 4 values."""
    kv = b""
    key = b"general.architecture"
    kv += struct.pack("<Q", len(key)) + key + struct.pack("<I", 8) + struct.pack("<Q", 5) + b"llama"
    key = b"llama.block_count"
    kv += struct.pack("<Q", len(key)) + key + struct.pack("<I", 4) + struct.pack("<I", 1)
    name = b"w"
    info = struct.pack("<Q", len(name)) + name + struct.pack("<I", 1) + struct.pack("<Q", 4) + struct.pack("<IQ", 0, 0)
    head = b"GGUF" + struct.pack("<IQQ", 3, 1, 2) + kv + info
    pad = b"\0" * (-len(head) % 32)
    return head + pad + struct.pack("<4f", 1, 2, 3, 4)


def test_small_gguf_parses(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(_small_gguf())
    gf = GGUFFile(path)
    assert gf.metadata["general.architecture"] == "llama" and gf.tensors["w"].shape == (4,)


@FUZZ
@given(st.data())
def test_mutated_gguf_gives_clean_errors(tmp_path, data):
    blob = bytearray(_small_gguf())
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
