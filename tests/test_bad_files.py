"""Every broken file gives a ModelFileError naming the file and the problem (DESIGN §2.8)."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from tiny_models import hf_mistral, save_consolidated, save_gguf, save_hf

import mistral7b
from mistral7b.errors import ModelFileError


@pytest.fixture(scope="module")
def model():
    return hf_mistral(n_heads=4, n_kv_heads=2, head_dim=16, window=8, seed=5)


def _raises(path, *fragments):
    with pytest.raises(ModelFileError) as info:
        mistral7b.load(path, dtype="float32")
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_path(tmp_path):
    _raises(tmp_path / "nope", str(tmp_path / "nope"), "no such file")


def test_folder_that_is_not_a_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    _raises(tmp_path, str(tmp_path), "params.json")


def test_truncated_safetensors(tmp_path, model):
    folder = save_hf(model, tmp_path / "hf")
    file = folder / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    _raises(folder, "model.safetensors", "truncated")


def test_safetensors_header_claiming_more_than_the_file(tmp_path, model):
    folder = save_hf(model, tmp_path / "hf")
    file = folder / "model.safetensors"
    file.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    _raises(folder, "model.safetensors")


def test_sharded_index_naming_a_missing_shard(tmp_path, model):
    folder = save_hf(model, tmp_path / "hf", max_shard_size="20KB")
    shard = max(folder.glob("model-*-of-*.safetensors"))
    shard.unlink()
    _raises(folder, "model.safetensors.index.json", shard.name)


def test_params_json_missing_a_field(tmp_path, model):
    folder = save_consolidated(model, tmp_path / "c")
    params = json.loads((folder / "params.json").read_text())
    del params["n_heads"]
    (folder / "params.json").write_text(json.dumps(params))
    _raises(folder, "params.json", "n_heads")


def test_params_json_not_json(tmp_path, model):
    folder = save_consolidated(model, tmp_path / "c")
    (folder / "params.json").write_text("{dim: 4")
    _raises(folder, "params.json", "not valid JSON")


def test_tensor_missing(tmp_path, model):
    from safetensors.numpy import load_file, save_file

    folder = save_consolidated(model, tmp_path / "c")
    file = folder / "consolidated.safetensors"
    state = load_file(str(file))
    del state["layers.1.feed_forward.w3.weight"]
    save_file(state, str(file))
    _raises(folder, "layers.1.feed_forward.w3.weight", "missing")


def test_tensor_of_the_wrong_shape_for_the_config(tmp_path, model):
    folder = save_consolidated(model, tmp_path / "c")
    params = json.loads((folder / "params.json").read_text())
    params["hidden_dim"] += 8
    (folder / "params.json").write_text(json.dumps(params))
    _raises(folder, "consolidated.safetensors", "feed_forward.w1.weight", "shape")


def test_pth_needing_unsafe_pickle_is_refused(tmp_path, model):
    folder = save_consolidated(model, tmp_path / "c", fmt="pth")
    file = folder / "consolidated.00.pth"
    state = torch.load(file, weights_only=True)
    state["evil"] = _Payload()
    torch.save(state, file)
    _raises(folder, "consolidated.00.pth", "refused")
    assert not (tmp_path / "pwned").exists()


class _Payload:
    """Unpickling this with an unsafe loader would run code; weights_only must refuse it."""

    def __reduce__(self):
        return (open, ("pwned", "w"))


def test_truncated_pth(tmp_path, model):
    folder = save_consolidated(model, tmp_path / "c", fmt="pth")
    file = folder / "consolidated.00.pth"
    file.write_bytes(file.read_bytes()[:1000])
    _raises(folder, "consolidated.00.pth")


# ------------------------------------------------------------------------------------ GGUF


@pytest.fixture()
def gguf_file(tmp_path, model):
    return save_gguf(model, tmp_path / "m.gguf")


def test_gguf_bad_magic(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[:4] = b"GGML"
    gguf_file.write_bytes(bytes(data))
    _raises(gguf_file, "m.gguf", "not a GGUF file")


def test_gguf_unsupported_version(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[4:8] = struct.pack("<I", 99)
    gguf_file.write_bytes(bytes(data))
    _raises(gguf_file, "m.gguf", "version 99")


def test_gguf_counts_larger_than_the_file(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    data[8:16] = struct.pack("<Q", 2**40)  # tensor count
    gguf_file.write_bytes(bytes(data))
    _raises(gguf_file, "m.gguf", "more than")


def test_gguf_truncated_tensor_data(gguf_file):
    data = gguf_file.read_bytes()
    gguf_file.write_bytes(data[: len(data) - 4096])
    _raises(gguf_file, "m.gguf", "truncated")


def test_gguf_truncated_header(gguf_file):
    gguf_file.write_bytes(gguf_file.read_bytes()[:20])
    _raises(gguf_file, "m.gguf", "truncated")


def _tensor_type_offset(data: bytes, name: bytes) -> int:
    at = data.index(struct.pack("<Q", len(name)) + name) + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, at)[0]
    return at + 4 + 8 * n_dims


def test_gguf_unknown_quantization_type(gguf_file):
    data = bytearray(gguf_file.read_bytes())
    at = _tensor_type_offset(bytes(data), b"blk.0.attn_q.weight")
    data[at: at + 4] = struct.pack("<I", 4242)
    gguf_file.write_bytes(bytes(data))
    _raises(gguf_file, "m.gguf", "unknown quantization type 4242")


def test_gguf_wrong_tensor_shape(tmp_path, model):
    import gguf

    path = tmp_path / "bad.gguf"
    save_gguf(model, path)
    reader = gguf.GGUFReader(str(path))
    assert reader.tensors  # sanity
    # Claim a bigger feed-forward width in the metadata than the tensors have.
    data = bytearray(path.read_bytes())
    key = b"llama.feed_forward_length"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key) + 4
    old = struct.unpack_from("<I", data, at)[0]
    data[at: at + 4] = struct.pack("<I", old + 32)
    path.write_bytes(bytes(data))
    _raises(path, "bad.gguf", "feed_forward.w1.weight", "shape")
