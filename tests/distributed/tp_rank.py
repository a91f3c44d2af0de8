"""One rank of a tensor-parallel run, started by the tests with torchrun's environment.

    python tp_rank.py MODEL QUANT OUT CHUNK [CHUNK ...]

Every rank calls `mistral7b.load(MODEL, tp=WORLD_SIZE)`; rank 0 (the only one that returns)
saves {chunk: logits of the ids in OUT.ids} to OUT.
"""

from __future__ import annotations

import os
import sys

import torch

import mistral7b


def main() -> None:
    model, quant, out, *chunks = sys.argv[1:]
    torch.set_num_threads(1)
    tp = int(os.environ["WORLD_SIZE"])
    llm = mistral7b.load(model, tp=tp, quant=None if quant == "none" else quant,
                         dtype="float32", kv_cache_memory=1 << 22)
    ids = torch.load(out + ".ids")
    result = {int(c): llm.logits(ids, chunk_size=int(c)) for c in chunks}
    torch.save(result, out)


if __name__ == "__main__":
    main()
