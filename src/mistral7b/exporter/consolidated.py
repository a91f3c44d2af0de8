"""`--to consolidated`: Mistral's own layout, as mistral-inference's `Transformer.from_folder`
reads it: `params.json` (ModelConfig.to_params_json: the reference's field names, rope_theta
always written) + `consolidated.safetensors` (our names, which are the reference's, and the
interleaved q/k rows) + the Mistral tokenizer file (export/tokenizer.py)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from mistral7b.exporter.source import MergedSource
from mistral7b.exporter.tokenizer import SourceTokenizer
from mistral7b.weights.safetensors_write import Entry, StreamWriter

WEIGHTS_FILE = "consolidated.safetensors"


def write_consolidated(source: MergedSource, out: Path, dtype: torch.dtype,
                       tokenizer: SourceTokenizer, step: Callable[[str], None]) -> list[str]:
    """Write the consolidated folder `out` (exists, empty); returns lines for the log."""
    entries = [Entry(n, dtype, s) for n, s in source.shapes.items()]
    with (out / WEIGHTS_FILE).open("wb") as f:
        writer = StreamWriter(f, entries)
        for name in source.names:
            t = source.tensor(name)
            out_t = t.to(dtype)
            writer.write(name, out_t)
            source.done(name, t)
            del out_t
            step(name)
    params = source.config.to_params_json()
    (out / "params.json").write_text(json.dumps(params, indent=2) + "\n")
    return [f"{WEIGHTS_FILE} + params.json", tokenizer.write_files(out, "consolidated")]
