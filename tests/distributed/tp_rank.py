"""One rank of a tensor-parallel run, started by the tests with torchrun's environment.

    python tp_rank.py logits MODEL QUANT OUT CHUNK [CHUNK ...]
        every rank calls `mistral7b.load(MODEL, tp=WORLD_SIZE)`; rank 0 (the only one that
        returns) saves {chunk: logits of the ids in OUT.ids} to OUT
    python tp_rank.py weights MODEL QUANT OUT
        every rank loads its shard alone and saves its quantized layers' weights, as the
        kernels see them (dequantized), to OUT.rankN
"""

from __future__ import annotations

import os
import sys

import torch

import mistral7b


def main() -> None:
    mode, model, quant, out, *chunks = sys.argv[1:]
    torch.set_num_threads(1)
    tp = int(os.environ["WORLD_SIZE"])
    q = None if quant == "none" else quant
    if mode == "weights":
        from mistral7b.distributed.tp_model import TensorParallel
        from mistral7b.weights import open_checkpoint

        group = TensorParallel(tp, torch.device("cpu"))
        net = group.load(open_checkpoint(model), q, dtype=torch.float32)
        torch.save({name: m.dequantize(torch.float32) for name, m in net.named_modules()
                    if hasattr(m, "dequantize")}, f"{out}.rank{group.rank.rank}")
        return
    llm = mistral7b.load(model, tp=tp, quant=q, dtype="float32", kv_cache_memory=1 << 22)
    ids = torch.load(out + ".ids")
    torch.save({int(c): llm.logits(ids, chunk_size=int(c)) for c in chunks}, out)


if __name__ == "__main__":
    main()
