"""LoRA / QLoRA fine-tuning of a loaded model on JSONL data (chat or plain text).

    import mistral7b
    from mistral7b.finetune import TrainConfig, Trainer, load_examples

    llm = mistral7b.load("default")
    examples, _ = load_examples("train.jsonl", llm.tokenizer, max_len=512)
    Trainer(llm, TrainConfig(steps=60, lr=1e-3), "out").fit(examples)
    # out/ now holds a PEFT adapter and Mistral's lora.safetensors;
    # mistral7b.lora.apply_lora_file(mistral7b.load("default"), "out") loads it back.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from mistral7b.finetune.data import DataError, Example, Record, read_records, tokenize
from mistral7b.finetune.trainer import StepInfo, TrainConfig, Trainer, TrainResult, lr_factor

if TYPE_CHECKING:
    from mistral7b.tokenizer.base import Tokenizer


def load_examples(path: str | Path, tokenizer: Tokenizer, *,
                  max_len: int) -> tuple[list[Example], int]:
    """Validate and tokenize a JSONL file: (examples, number cut to max_len)."""
    return tokenize(read_records(path), tokenizer, max_len=max_len, path=path)


__all__ = [
    "DataError", "Example", "Record", "StepInfo", "TrainConfig", "TrainResult", "Trainer",
    "load_examples", "lr_factor", "read_records", "tokenize",
]
