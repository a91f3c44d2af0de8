"""Where the outside references live: `tests/reference/` holds byte-for-byte copies of what
HF transformers and llama.cpp computed on the embedded default model (its README says how).
The repository carries them so that a fresh clone tests without anything beside it."""

from pathlib import Path

SMOLLM2 = Path(__file__).resolve().parent / "reference" / "smollm2"
SMOLLM2_JSON = SMOLLM2 / "reference.json"
