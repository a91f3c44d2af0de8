"""`QuantEmbedding`: a GGUF token-embedding table kept in the file's blocks, each looked-up
row dequantized when it is needed (as llama.cpp's get_rows does).

A 7B table is 32000 x 4096: 262 MB in bfloat16, 74 MB as the Q4_K blocks of a Q4_K_M file.
Only the rows of the tokens fed are read, so keeping the blocks costs nothing per step (a
decode step reads one row) and saves the difference for the whole run. Each row comes out
as gguf's dequantizer computes it (native.gguf_dequantize, bit for bit), in the dtype the
table would have had (`table_dtype`), so the model sees the same numbers as from a table
dequantized at load and cast. Built by load.py for an untied table on the CPU where our
kernel library runs.
"""

from __future__ import annotations

import torch
from torch import nn

from mistral7b.kernels import native


class QuantEmbedding(nn.Module):
    """nn.Embedding's lookup over GGUF blocks: `blocks` (vocab, bytes per row) uint8."""

    blocks: torch.Tensor

    def __init__(self, blocks: torch.Tensor, qtype_name: str, embedding_dim: int,
                 table_dtype: torch.dtype) -> None:
        super().__init__()
        self.qtype_name = qtype_name
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.table_dtype = table_dtype
        self.register_buffer("blocks", blocks)

    @property
    def table_device(self) -> torch.device:
        return self.blocks.device

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The table's rows `ids` (1-D) as float32 (len, dim)."""
        picked = self.blocks.index_select(0, ids)
        out = native.gguf_dequantize(self.qtype_name, picked.reshape(-1), len(ids),
                                     self.embedding_dim)
        assert out is not None, "QuantEmbedding is only built where the kernel library runs"
        return out

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.num_embeddings):
            raise IndexError(f"token ids must be in [0, {self.num_embeddings})")
        flat = self.rows(tokens.reshape(-1).long()).to(self.table_dtype)
        return flat.view(*tokens.shape, self.embedding_dim)

    @property
    def weight(self) -> torch.Tensor:
        """The whole table dequantized (vocab, dim) in `table_dtype`: a fresh tensor each time,
        for what reads the table as a whole (an export, a tied output); the model never does."""
        ids = torch.arange(self.num_embeddings, device=self.blocks.device)
        return self.rows(ids).to(self.table_dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, {self.qtype_name} blocks"
