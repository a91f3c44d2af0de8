"""mistral7b: Mistral 7B (and Llama-architecture models) in Python on PyTorch.

    import mistral7b
    llm = mistral7b.load("default")
    print(llm.generate("The capital of France is", max_tokens=8).text)
"""

from mistral7b.api import LLM, load
from mistral7b.config import PRESETS, ModelConfig
from mistral7b.engine import Completion
from mistral7b.errors import InputError, Mistral7BError, ModelFileError, TokenizerError
from mistral7b.sampling import SamplingParams

__all__ = [
    "LLM", "Completion", "InputError", "Mistral7BError", "ModelConfig", "ModelFileError",
    "PRESETS", "SamplingParams", "TokenizerError", "load",
]
__version__ = "0.1.0"
