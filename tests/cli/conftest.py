"""Fixtures for the command-line tests (helpers are in cli_helpers.py)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import REFERENCE


@pytest.fixture(scope="session")
def reference() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} is missing")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="session")
def tokenizer():
    """The default model's tokenizer (from its GGUF metadata; no weights loaded)."""
    from mistral7b.default_model import default_model_path
    from mistral7b.tokenizer import load_tokenizer

    return load_tokenizer(default_model_path())


@pytest.fixture(scope="session")
def llm():
    """The default model in this process: what the command line must agree with."""
    import mistral7b

    return mistral7b.load("default")
