"""The Mistral 7B decoder: RMSNorm, grouped-query attention with RoPE, SwiGLU. One file.

Module and parameter names follow Mistral's consolidated checkpoints (`wq`, `attention_norm`,
`feed_forward.w1`), so a state dict in that naming loads with a plain `load_state_dict`.
Shapes: B = batch rows, T = tokens in this step, D = dim, H = n_heads, KV = n_kv_heads,
Dh = head_dim, G = H // KV query heads per kv head, K = keys attended to.

This file knows nothing of quantization or LoRA: both replace `nn.Linear` modules from outside.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mistral7b.attention_plan import PAGED_MAX_T, AttentionPlan
from mistral7b.cache import KVPool
from mistral7b.config import ModelConfig
from mistral7b.kernels import native
from mistral7b.rope import apply_rope, rope_angles


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.dtype == torch.float32 and self.weight.dtype == torch.float32
                and x.device.type == "cpu"
                and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))):
            ops = native.ops()
            if ops is not None:   # ours: the fused decode step computes the same bits
                return ops.rms_norm(x, self.weight, self.eps)
        # Normalise in float32 whatever the activation dtype, as the reference does.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.n_heads, self.n_kv_heads = config.n_heads, config.n_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVPool | None, plan: AttentionPlan) -> torch.Tensor:
        B, T, _ = x.shape
        KV, G, Dh = self.n_kv_heads, self.n_heads // self.n_kv_heads, self.head_dim
        q = self.wq(x).view(B, T, self.n_heads, Dh)
        k = self.wk(x).view(B, T, KV, Dh)
        v = self.wv(x).view(B, T, KV, Dh)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        # (B, KV, T, Dh): the cache layout. Rotated k goes into the cache.
        k, v = k.transpose(1, 2), v.transpose(1, 2)
        if (T <= PAGED_MAX_T and cache is not None and cache.paged is not None
                and q.dtype == torch.float32):
            # decode, verification: our kernel reads the keys in the pool where they are
            out = cache.paged_attention(self.layer_id, q.reshape(B * T, self.n_heads, Dh), k, v,
                                        plan)
            return self.wo(out.view(B, T, -1))
        keys, values = (k, v) if cache is None else cache.update(self.layer_id, k, v, plan)
        if keys.dtype != q.dtype:   # float32 activations over a bfloat16 cache
            keys, values = keys.to(q.dtype), values.to(q.dtype)
        # Grouped-query attention without copying k/v: fold each kv head's G query heads into
        # the query-length axis, (B, T, KV*G, Dh) -> (B, KV, G*T, Dh). Query heads
        # kv*G .. kv*G+G-1 share kv head kv, as in the reference (repeat_interleave order).
        q = q.view(B, T, KV, G, Dh).permute(0, 2, 3, 1, 4).reshape(B, KV, G * T, Dh)
        mask = plan.grouped_mask(G)                                          # (B, 1, G*T, K)
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # (B, KV, G*T, Dh)
        out = out.view(B, KV, G, T, Dh).permute(0, 3, 1, 2, 4).reshape(B, T, -1)
        return self.wo(out)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(config.hidden_dim, config.dim, bias=False)  # down
        self.w3 = nn.Linear(config.dim, config.hidden_dim, bias=False)  # up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.attention = Attention(config, layer_id)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.feed_forward = FeedForward(config)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVPool | None, plan: AttentionPlan) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin, cache, plan)
        return h + self.feed_forward(self.ffn_norm(h))


class Transformer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        # Built on the meta device (every loader) there is nothing to initialise: skip
        # Embedding's normal_, whose meta version imports torch._dynamo (1.5 s of a load).
        on_meta = torch.empty(0).is_meta
        table = torch.empty(config.vocab_size, config.dim) if on_meta else None
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim, _weight=table)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)
        self.output = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tied_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # The activations' dtype where it is not the embedding table's: see compute_in_float32
        self.compute_dtype: torch.dtype | None = None

    def compute_in_float32(self) -> None:
        """Compute in float32 over a lower-precision embedding table (and KV cache, which the
        engine sizes by the table's dtype): for a model whose linears are all int4/int8 on the
        CPU, where activations cost nothing to keep in float32 (as llama.cpp does) and they are
        what the fused decode step takes. The norm weights become float32 (a few KB)."""
        for module in self.modules():
            if isinstance(module, RMSNorm) and module.weight.dtype != torch.float32:
                module.weight = nn.Parameter(module.weight.detach().float(),
                                             requires_grad=module.weight.requires_grad)
        self.compute_dtype = torch.float32

    @property
    def table_device(self) -> torch.device:
        """Where the embedding table is (a GGUF table kept in its blocks says so itself:
        quant/qembedding.py)."""
        emb = self.tok_embeddings
        return getattr(emb, "table_device", None) or emb.weight.device

    @property
    def table_dtype(self) -> torch.dtype:
        """The embedding table's dtype, which the KV cache takes (Engine.dtype)."""
        emb = self.tok_embeddings
        return getattr(emb, "table_dtype", None) or emb.weight.dtype

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (B, T) -> (B, T, D) in the dtype the layers compute in."""
        x = self.tok_embeddings(tokens)
        return x if self.compute_dtype is None else x.to(self.compute_dtype)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, cache: KVPool | None,
                plan: AttentionPlan, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """tokens, positions: (B, T) -> float32 logits (B, T, vocab).

        With a cache the step goes through it (KVPool.plan); without one (training,
        scoring) the keys are this step's own tokens under cache.uncached_plan's mask.
        With `logits_index` (B, n) only those positions of each row get logits (B, n, vocab):
        generation needs just the last one, and the output projection is not cheap.
        """
        x = self.embed(tokens)                                               # (B, T, D)
        cos, sin = rope_angles(positions, self.config.head_dim, self.config.rope_theta)
        for layer in self.layers:
            x = layer(x, cos, sin, cache, plan)
        return self.head(x, logits_index)

    def head(self, x: torch.Tensor, logits_index: torch.Tensor | None = None) -> torch.Tensor:
        """Hidden states (B, T, D) after the last layer -> float32 logits (B, T, vocab), or
        those of the positions `logits_index` (B, n) names only (B, n, vocab)."""
        if logits_index is not None:
            x = torch.gather(x, 1, logits_index[:, :, None].expand(-1, -1, x.shape[-1]))
        return self.output(self.norm(x)).float()
