"""Fixtures for the fine-tuning tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

# The tiny model with a character tokenizer is shared with the evaluation tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "eval"))


@pytest.fixture(scope="session")
def tiny_chat_folder(tmp_path_factory):
    """(HF model, folder): a tiny random Mistral (window 8) with a char tokenizer (ChatML)."""
    from tiny_tokenized import tiny_model_folder

    return tiny_model_folder(tmp_path_factory.mktemp("tiny_chat"))
