"""`mistral7b quantize` end to end: the written folder loads back quantized, with the same
logits as quantizing on load, and keeps the source's tokenizer."""

from __future__ import annotations

import torch
from tiny_models import hf_mistral, save_gguf

from mistral7b.cli import quantize
from mistral7b.engine import Engine
from mistral7b.quant import Int4Linear, load_quantized, stored_quant
from mistral7b.weights import open_checkpoint


def test_quantize_command_writes_a_loadable_int4_folder(tmp_path, capsys):
    model = hf_mistral(dim=128, hidden=256, n_heads=4, n_kv_heads=2, head_dim=32, seed=7)
    src = save_gguf(model, tmp_path / "m.gguf")
    assert quantize.main([str(src), str(tmp_path / "q"), "--to", "int4"]) == 0
    out = capsys.readouterr().out.strip()
    reader = open_checkpoint(out)
    assert stored_quant(reader) == "int4"
    loaded = load_quantized(reader, None, dtype=torch.float32, device="cpu")
    assert isinstance(loaded.layers[0].feed_forward.w2, Int4Linear)
    direct = load_quantized(open_checkpoint(src), "int4", dtype=torch.float32, device="cpu")
    ids = [1, 2, 3, 50, 60]
    assert torch.equal(Engine(loaded, loaded.config).logits(ids),
                       Engine(direct, direct.config).logits(ids))


def test_quantize_refuses_a_non_empty_destination(tmp_path, capsys):
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "x").write_text("keep me")
    # a user's mistake: one clear line and exit 2, and nothing in the folder is touched
    assert quantize.main(["default", str(tmp_path / "q"), "--to", "int8"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "not an empty folder" in err
    assert (tmp_path / "q" / "x").read_text() == "keep me"


def test_default_model_quantized_keeps_its_tokenizer(tmp_path):
    from mistral7b.tokenizer import GGUFTokenizer, load_tokenizer

    assert quantize.main(["default", str(tmp_path / "q"), "--to", "int4"]) == 0
    tok = GGUFTokenizer.from_file(tmp_path / "q" / "tokenizer.gguf")
    ref = load_tokenizer(_default())
    assert tok.encode("The capital of France is", bos=True) == \
        ref.encode("The capital of France is", bos=True)


def _default():
    from mistral7b.default_model import default_model_path

    return default_model_path()
