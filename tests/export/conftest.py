"""Fixtures for the export tests: tiny random models with real tokenizers and adapters."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

# The tokenizer oracles (mistral-common, the SmolLM2 vocabulary) are shared with those tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tokenizer"))

@pytest.fixture(scope="module")
def tiny_consolidated(tmp_path_factory):
    """The tiny HF Mistral of the parity tests (GQA 4/2, window 8) as a consolidated folder,
    and the transformers model it came from."""
    from tiny_models import hf_mistral, save_consolidated

    hf = hf_mistral(seed=3)
    return hf, save_consolidated(hf, tmp_path_factory.mktemp("tiny_consolidated"))


def _v3_model(folder: Path, hidden: int) -> Path:
    import mistral_common
    from tiny_models import hf_mistral, save_consolidated

    model = hf_mistral(vocab=32768, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16,
                       hidden=hidden, window=None, theta=1e6, seed=5)
    save_consolidated(model, folder)
    shipped = Path(mistral_common.__file__).parent / "data" / \
        "mistral_instruct_tokenizer_240323.model.v3"
    shutil.copy(shipped, folder / "tokenizer.model.v3")
    return folder


@pytest.fixture(scope="module")
def v3_folder(tmp_path_factory):
    """A tiny model with Mistral 7B v0.3's vocabulary and its v3 tokenizer file; hidden_dim
    80 is not a multiple of the 32-weight blocks (w2's rows)."""
    return _v3_model(tmp_path_factory.mktemp("v3"), hidden=80)


@pytest.fixture(scope="module")
def v3_blocks_folder(tmp_path_factory):
    """The same with hidden_dim 64: every matrix row is whole blocks of 32."""
    return _v3_model(tmp_path_factory.mktemp("v3_blocks"), hidden=64)


@pytest.fixture(scope="module")
def smollm2_hf_folder(tmp_path_factory):
    """A tiny Llama-architecture HF model with the SmolLM2 tokenizer as tokenizer.json +
    tokenizer_config.json (byte-level BPE, ChatML template), as an HF repository has it."""
    from tiny_models import hf_mistral, save_hf
    from tokenizer_cases import smollm2_tokenizer

    model = hf_mistral(vocab=49152, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16,
                       hidden=64, window=None, seed=7)
    folder = save_hf(model, tmp_path_factory.mktemp("smollm2_hf"))
    tok = smollm2_tokenizer()
    tok.backend.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": tok.chat_template, "bos_token": "<|im_start|>",
        "eos_token": "<|im_end|>", "add_bos_token": False}))
    return folder
