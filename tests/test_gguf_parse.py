"""Our GGUF header parser against the `gguf` package's reader (the outside reference): the
same metadata, tensor infos and tensor bytes, on the embedded default model and on files the
tests write; its type table equals gguf's; crafted counts fail fast with a clear error."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from tiny_models import hf_mistral, save_gguf

from mistral7b.errors import ModelFileError
from mistral7b.weights.gguf_parse import GGML_TYPES, open_gguf, parse_header, tensor_view

gguf = pytest.importorskip("gguf")


def test_type_table_matches_gguf():
    for kind in gguf.GGMLQuantizationType:
        if kind.value in GGML_TYPES:
            ours = GGML_TYPES[kind.value]
            assert ours.name == kind.name
            assert (ours.block_size, ours.type_size) == tuple(gguf.GGML_QUANT_SIZES[kind])
    # every type a llama.cpp quantization of a Mistral model uses is known
    assert {"Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q4_K", "Q5_K", "Q6_K", "BF16"} <= \
        {t.name for t in GGML_TYPES.values()}


def _same_as_gguf(path):
    data, header = open_gguf(path)
    ref = gguf.GGUFReader(str(path))
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # header words
    assert set(header.metadata) == set(fields)
    assert ref.fields["GGUF.version"].contents() == header.version
    for key, field in fields.items():
        want = field.contents()
        assert header.metadata[key] == want, key
        assert header.types[key][0] == field.types[0], key
    assert [t.name for t in ref.tensors] == list(header.tensors)
    for t in ref.tensors:
        ours = header.tensors[t.name]
        assert ours.type.id == t.tensor_type.value and ours.n_bytes == t.n_bytes
        assert ours.dims == tuple(int(d) for d in t.shape)
        assert ours.offset == t.data_offset
        got = tensor_view(data, ours)
        assert np.array_equal(got.reshape(-1).view(np.uint8),
                              np.asarray(t.data).reshape(-1).view(np.uint8)), t.name


def test_default_model_header_equals_gguf_reader():
    from mistral7b.default_model import default_model_path

    _same_as_gguf(default_model_path())


def test_written_file_equals_gguf_reader(tmp_path):
    rng = np.random.default_rng(0)
    model = hf_mistral(dim=64, n_layers=1)
    blocks = gguf.quants.quantize(rng.standard_normal((128, 64)).astype(np.float32),
                                  gguf.GGMLQuantizationType.Q8_0)
    path = save_gguf(model, tmp_path / "m.gguf",
                     raw={"blk.0.ffn_gate.weight": (blocks, gguf.GGMLQuantizationType.Q8_0)})
    _same_as_gguf(path)


def _header(*kvs: bytes, n_kv: int | None = None, n_tensors: int = 0) -> bytes:
    n = len(kvs) if n_kv is None else n_kv
    return b"GGUF" + struct.pack("<IQQ", 3, n_tensors, n) + b"".join(kvs)


def _string(s: bytes) -> bytes:
    return struct.pack("<Q", len(s)) + s


@pytest.mark.parametrize("body, problem", [
    # an array that claims 2^40 items in a few bytes
    (_string(b"a") + struct.pack("<IIQ", 9, 4, 1 << 40) + b"\0" * 64, "claims"),
    (_string(b"a") + struct.pack("<IIQ", 9, 8, 1 << 40) + b"\0" * 64, "claims"),
    # a string longer than the file
    (_string(b"a") + struct.pack("<IQ", 8, 1 << 50) + b"x" * 40, "needs"),
    # arrays of arrays nested past the limit
    (_string(b"a") + struct.pack("<IIQ", 9, 9, 1) + struct.pack("<IQ", 9, 1) * 6 + b"\0" * 64,
     "nests"),
    (_string(b"a") + struct.pack("<I", 77) + b"\0" * 32, "unknown value type"),
])
def test_crafted_counts_fail_at_once(body, problem):
    with pytest.raises(ModelFileError, match=problem):
        parse_header(_header(body), __import__("pathlib").Path("x.gguf"))


def test_huge_metadata_count_is_refused_before_walking():
    with pytest.raises(ModelFileError, match="more than a"):
        parse_header(_header(n_kv=1 << 60) + b"\0" * 64, __import__("pathlib").Path("x.gguf"))
