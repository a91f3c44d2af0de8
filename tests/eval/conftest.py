"""Fixtures for the evaluation tests: a tiny model with a character tokenizer."""

from __future__ import annotations

import pytest
from tiny_tokenized import tiny_model_folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """(HF model, folder): a tiny random Mistral (window 8) with a char tokenizer."""
    return tiny_model_folder(tmp_path_factory.mktemp("tiny_tok"))
