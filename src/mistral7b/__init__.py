"""mistral7b: Mistral 7B (and Llama-architecture models) in Python on PyTorch.

    import mistral7b
    llm = mistral7b.load("default")
    print(llm.generate("The capital of France is", max_tokens=8).text)

Importing the package is cheap: torch and the model code load on first use of `load`.
"""

from __future__ import annotations

import importlib
from typing import Any

from mistral7b.errors import InputError, Mistral7BError, ModelFileError, TokenizerError

_LAZY = {
    "load": "mistral7b.api", "LLM": "mistral7b.api", "TextStream": "mistral7b.text_stream",
    "Completion": "mistral7b.sequence", "ModelConfig": "mistral7b.config",
    "PRESETS": "mistral7b.config", "SamplingParams": "mistral7b.sampling",
    "export": "mistral7b.exporter",
}

__all__ = [
    "LLM", "PRESETS", "Completion", "InputError", "Mistral7BError", "ModelConfig",
    "ModelFileError", "SamplingParams", "TextStream", "TokenizerError", "export", "load",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'mistral7b' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
