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
def _default_llm():
    import mistral7b

    return mistral7b.load("default", quant="auto")


@pytest.fixture
def llm(_default_llm):
    """The default model in this process as the command line loads it by default (its own
    Q4_1 blocks, quant="auto"): what the command line must agree with. Its prefix cache
    starts empty, as a new CLI process's does: the int4 kernel's pre-fill and decode round
    activations differently, so KV reused from another test's turns could flip a near tie."""
    _default_llm.clear_cache()
    return _default_llm
