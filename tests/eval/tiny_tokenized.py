"""A tiny random HF Mistral folder *with* a tokenizer: one token per character.

tests/tiny_models.py builds models without tokenizers; the command-line tools and the
lm-eval model need text in and text out. A character-level `tokenizers` BPE (no merges)
over printable ASCII fits in a vocabulary of 128, so the whole model loads in milliseconds.
"""

from __future__ import annotations

import json
from pathlib import Path

from tiny_models import hf_mistral, save_hf

SPECIALS = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
CHARS = ["\n"] + [chr(c) for c in range(32, 127)]
VOCAB = 128


def write_char_tokenizer(folder: Path) -> Path:
    from tokenizers import AddedToken, Tokenizer, decoders, models

    vocab = {tok: i for i, tok in enumerate(SPECIALS + CHARS)}
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True) for s in SPECIALS])
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}))
    return folder


def tiny_model_folder(folder: Path, *, window: int | None = 8, seed: int = 0):
    """An HF folder (config, safetensors, char tokenizer); returns (hf_model, folder)."""
    hf = hf_mistral(vocab=VOCAB, window=window, seed=seed)
    save_hf(hf, folder)
    write_char_tokenizer(folder)
    return hf, folder
