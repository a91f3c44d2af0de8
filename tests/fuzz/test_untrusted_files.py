"""Each class of hostile model file from issue 14, written here, gets a clean ModelFileError
that names the file and what is wrong, fast (no hang, no raw exception, no NaN model)."""

from __future__ import annotations

import json
import struct
import time

import fuzz_mutate
import fuzz_seeds
import numpy as np
import pytest
from gguf import GGUFValueType as T

import mistral7b
from mistral7b.errors import ModelFileError, TokenizerError


def _refused(path, *fragments, seconds: float = 5.0) -> str:
    t0 = time.perf_counter()
    with pytest.raises(ModelFileError) as info:
        mistral7b.load(path, dtype="float32")
    assert time.perf_counter() - t0 < seconds  # a generous bound: a hang would be minutes
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def _field(data: bytes, what: str, nth: int = 0) -> tuple[int, int]:
    found = [(at, size) for at, size, w in fuzz_mutate.gguf_fields(data)[0] if w == what]
    return found[nth]


# ------------------------------------------------------------------- counts and shapes


@pytest.mark.parametrize("layers", [2**31, 2**32 - 1, 40_000])
def test_gguf_absurd_block_count(tmp_path, layers):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf",
                                 metadata={"llama.block_count": (layers, T.UINT32)})
    _refused(path, "m.gguf", "block_count")


def test_gguf_block_count_beyond_the_tensors_in_the_file(tmp_path):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf",
                                 metadata={"llama.block_count": (5000, T.UINT32)})
    _refused(path, "n_layers=5000", "tensors")


@pytest.mark.parametrize("value", [1e30, 2**40, "32", [32], None, True, -2])
def test_config_json_layer_count_of_the_wrong_type_or_range(tmp_path, value):
    folder = fuzz_seeds.write_hf(tmp_path / "hf")
    config = {**fuzz_seeds.hf_config(), "num_hidden_layers": value}
    (folder / "config.json").write_text(json.dumps(config))
    _refused(folder, "config.json", "num_hidden_layers")


def test_gguf_array_claiming_more_items_than_the_file_holds(tmp_path):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at, _ = _field(bytes(data), "count")  # the first array: tokenizer.ggml.tokens
    data[at: at + 8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))
    _refused(path, "m.gguf", "corrupt GGUF header", "tokenizer.ggml.tokens", "1099511627776 strings")


def test_gguf_string_longer_than_the_file(tmp_path):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at, _ = _field(bytes(data), "value.len")
    data[at: at + 8] = struct.pack("<Q", 2**62)
    path.write_bytes(bytes(data))
    _refused(path, "m.gguf", "past the end of the file")


# --------------------------------------------------------------- config values, 3 formats

BAD_VALUES = {
    "string": "4096", "list": [1, 2], "nan": float("nan"), "infinity": float("inf"),
    "huge int": 10**40, "negative": -8, "zero": 0, "object": {"a": 1}, "bool": True,
}


@pytest.mark.parametrize("key", ["dim", "n_heads", "hidden_dim", "norm_eps", "vocab_size",
                                 "rope_theta", "n_kv_heads", "max_seq_len"])
@pytest.mark.parametrize("kind", list(BAD_VALUES))
def test_params_json_value_of_the_wrong_type_or_range(tmp_path, key, kind):
    folder = fuzz_seeds.write_consolidated(tmp_path / "c")
    if kind == "zero" and key in ("n_kv_heads", "max_seq_len"):
        pytest.skip("0 means 'absent' (the default) for this field")
    params = {**fuzz_seeds.params_json(), key: BAD_VALUES[kind]}
    (folder / "params.json").write_text(json.dumps(params))  # NaN/Infinity as JSON allows
    _refused(folder, "params.json", key)


@pytest.mark.parametrize("raw", [b"\xff\xfe{}", b"[" * 100_000 + b"]" * 100_000,
                                 b'{"dim": ' + b"9" * 5000 + b"}", b"[]", b"1e999"])
def test_config_json_that_is_not_a_config(tmp_path, raw):
    folder = fuzz_seeds.write_hf(tmp_path / "hf")
    (folder / "config.json").write_bytes(raw)
    _refused(folder, "config.json")


@pytest.mark.parametrize(("key", "value"), [
    ("rope_scaling", "yarn"), ("rope_parameters", [1]), ("architectures", "Mistral"),
    ("tie_word_embeddings", "yes"), ("use_sliding_window", 1),
])
def test_config_json_nested_fields_of_the_wrong_type(tmp_path, key, value):
    folder = fuzz_seeds.write_hf(tmp_path / "hf")
    (folder / "config.json").write_text(json.dumps({**fuzz_seeds.hf_config(), key: value}))
    _refused(folder, "config.json", key)


@pytest.mark.parametrize(("key", "value", "fragment"), [
    ("llama.embedding_length", ("32", T.STRING), "embedding_length"),
    ("llama.attention.layer_norm_rms_epsilon", (float("nan"), T.FLOAT32), "epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (0.0, T.FLOAT32), "epsilon"),
    ("llama.attention.layer_norm_rms_epsilon", (-1e-5, T.FLOAT32), "epsilon"),
    ("llama.rope.freq_base", (1e-30, T.FLOAT32), "freq_base"),
    ("llama.rope.freq_base", (float("inf"), T.FLOAT32), "freq_base"),
    ("llama.attention.sliding_window", (2**30, T.UINT32), "sliding_window"),
    ("llama.attention.head_count", ([4, 4], T.ARRAY), "head_count"),
    ("general.architecture", (7, T.UINT32), "architecture"),
])
def test_gguf_metadata_of_the_wrong_type_or_range(tmp_path, key, value, fragment):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf", metadata={key: value})
    _refused(path, "m.gguf", fragment)


def test_window_longer_than_the_context(tmp_path):
    folder = fuzz_seeds.write_consolidated(tmp_path / "c")
    params = {**fuzz_seeds.params_json(), "sliding_window": 10**6, "max_seq_len": 256}
    (folder / "params.json").write_text(json.dumps(params))
    _refused(folder, "sliding_window", "longer than the context")


# ------------------------------------------------------------------------- GGUF offsets


def _tensor_offset(data: bytes, nth: int) -> int:
    return _field(data, "tensor offset", nth)[0]


@pytest.mark.parametrize(("change", "fragment"), [
    (lambda old: old + 4, "not aligned"),
    (lambda old: 0, "leaves a gap or overlaps"),
    (lambda old: old + 64, "leaves a gap or overlaps"),
])
def test_gguf_tensor_offsets_unaligned_overlapping_or_zero(tmp_path, change, fragment):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at = _tensor_offset(bytes(data), 3)
    old = struct.unpack_from("<Q", data, at)[0]
    data[at: at + 8] = struct.pack("<Q", change(old))
    path.write_bytes(bytes(data))
    _refused(path, "m.gguf", fragment)


def test_gguf_tensor_type_changed_so_bytes_read_as_another_type(tmp_path):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at, _ = _field(bytes(data), "tensor type", 2)
    data[at: at + 4] = struct.pack("<I", 1)  # F32 -> F16: half the bytes, the rest shifts
    path.write_bytes(bytes(data))
    _refused(path, "m.gguf", "expected")


def test_gguf_last_tensor_type_changed_reads_non_finite_values(tmp_path):
    # The last tensor has no follower to betray its size: its F32 bytes read as F16 hold
    # infinities and NaNs (an F32 exponent byte of 0x7f.. read as a half), refused by name.
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    n_tensors = struct.unpack_from("<Q", data, 8)[0]
    at, _ = _field(bytes(data), "tensor type", n_tensors - 1)
    data[at: at + 4] = struct.pack("<I", 1)
    path.write_bytes(bytes(data))
    try:
        mistral7b.load(path, dtype="float32")
    except ModelFileError as exc:
        assert "m.gguf" in str(exc)
    else:  # it may read as finite halves: then the model must still compute finite logits
        llm = mistral7b.load(path, dtype="float32")
        assert bool(np.isfinite(llm.logits([3, 4, 5]).numpy()).all())


# ---------------------------------------------------------------------------- tensor data


def test_nan_in_a_float_tensor_is_refused_with_its_name(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = fuzz_seeds.write_hf(tmp_path / "hf")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.1.mlp.up_proj.weight"][3, 5] = np.nan
    save_file(state, str(folder / "model.safetensors"))
    _refused(folder, "model.safetensors", "model.layers.1.mlp.up_proj.weight", "non-finite")


def test_infinity_in_a_gguf_f32_tensor_is_refused_with_its_name(tmp_path):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    _, start, _ = fuzz_mutate.gguf_fields(bytes(data))
    data[start: start + 4] = struct.pack("<f", float("inf"))  # the first tensor's first value
    path.write_bytes(bytes(data))
    _refused(path, "m.gguf", "tok_embeddings.weight", "non-finite")


def test_huge_value_in_a_float_tensor_is_refused(tmp_path):
    from safetensors.numpy import load_file, save_file

    folder = fuzz_seeds.write_consolidated(tmp_path / "c")
    state = load_file(str(folder / "consolidated.safetensors"))
    state["norm.weight"][0] = 3e38
    save_file(state, str(folder / "consolidated.safetensors"))
    _refused(folder, "norm.weight", "out of range")


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_non_finite_scale_of_a_quantized_block(tmp_path, quant):
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf", quantized=True)
    data = bytearray(path.read_bytes())
    import gguf

    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.tensor_type.name == "Q8_0")
    at = int(t.data_offset) + 34 * 3          # block 3's scale (d, float16)
    data[at: at + 2] = b"\x00\x7c"             # +inf
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match=rf"{t.name.split('.')[-2]}|non-finite scale"):
        mistral7b.load(path, quant=quant)


# -------------------------------------------------------------------- other file classes


def test_shard_index_pointing_outside_the_folder(tmp_path):
    folder = fuzz_seeds.write_hf(tmp_path / "hf")
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "../../etc/passwd"}}))
    _refused(folder, "index.json", "no paths")


@pytest.mark.parametrize(("name", "value"), [("tokens", [1, 2, 3]), ("eos_token_id", "2"),
                                             ("add_bos_token", 3), ("merges", 5)])
def test_gguf_tokenizer_metadata_of_the_wrong_type(tmp_path, name, value):
    import fuzz_harness

    from mistral7b.tokenizer import GGUFTokenizer

    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf", tokenizer={name: None})
    path.write_bytes(fuzz_harness._add_kv(path.read_bytes(), f"tokenizer.ggml.{name}", value))
    with pytest.raises(TokenizerError, match=f"tokenizer.ggml.{name} must be"):
        GGUFTokenizer.from_file(path)
    llm = mistral7b.load(path, dtype="float32")   # the weights are fine: the model loads
    assert llm.tokenizer is None and bool(np.isfinite(llm.logits([1, 2]).numpy()).all())


def test_chat_template_that_would_exhaust_memory_or_time(tmp_path):
    nested = ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
              "{% endfor %}")
    for template in ["{{ messages[0].content * 100000000 }}", nested]:
        path = fuzz_seeds.write_gguf(tmp_path / "m.gguf", tokenizer={"chat_template": template})
        llm = mistral7b.load(path, dtype="float32")
        t0 = time.perf_counter()
        with pytest.raises(TokenizerError, match="sandbox"):
            llm.chat([{"role": "user", "content": "hi"}], max_tokens=1)
        assert time.perf_counter() - t0 < 30


def test_tokenizer_only_gguf_is_walked_with_the_same_bounds(tmp_path):
    """`load_tokenizer(x.gguf)` (and a quantized folder's tokenizer.gguf) reads the header
    through the same bounded walk as the weights."""
    from mistral7b.tokenizer import load_tokenizer

    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf")
    data = bytearray(path.read_bytes())
    at, _ = _field(bytes(data), "count")
    data[at: at + 8] = struct.pack("<Q", 2**40)
    path.write_bytes(bytes(data))
    with pytest.raises(TokenizerError, match="1099511627776 strings"):
        load_tokenizer(path)


@pytest.mark.parametrize("quant", [None, "int8", "int4"])
def test_last_tensor_shape_changed_in_a_quantized_gguf(tmp_path, quant):
    """The last tensor has no follower to betray a smaller size: its shape is checked
    against the config on the quantized load path as on the float one (found by the fuzzer:
    the int8 kernel failed at the first forward)."""
    path = fuzz_seeds.write_gguf(tmp_path / "m.gguf", quantized=True)
    data = bytearray(path.read_bytes())
    dims = [at for at, _, what in fuzz_mutate.gguf_fields(bytes(data))[0] if what == "dim"]
    at = dims[-1]                                   # the last tensor's row count
    data[at: at + 8] = struct.pack("<Q", 33)
    path.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="has shape"):
        mistral7b.load(path, quant=quant)
