"""A Mistral-7B-shaped model with random int4 weights, built in memory one layer at a time
(peak: the int4 weights plus one float layer), with the tokenizer mistral-common ships for
its vocabulary. For benchmarks of what does not depend on the weights' values (memory,
scheduling, cache reuse) where writing a 4 GB GGUF first would cost minutes.

    llm = random_int4_llm("mistral-7b-v0.3")     # no window, 32k context, v3 tokenizer
"""

from __future__ import annotations

from pathlib import Path

import torch

from mistral7b.api import LLM
from mistral7b.config import PRESETS
from mistral7b.model import Transformer
from mistral7b.modules import swap_module
from mistral7b.quant.convert import linear_names, quantize_tensor
from mistral7b.quant.load import make_linear
from mistral7b.tokenizer.mistral import MistralTokenizer


def random_int4_llm(preset: str = "mistral-7b-v0.3", seed: int = 0,
                    kv_cache_memory: int | None = None) -> LLM:
    config = PRESETS[preset]
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(config)
    dtype = torch.bfloat16
    for name in linear_names(config):
        module_name = name.removesuffix(".weight")
        meta = model.get_submodule(module_name)
        w = torch.randn(meta.out_features, meta.in_features, dtype=dtype) * meta.in_features**-0.5
        swap_module(model, module_name, make_linear(quantize_tensor(w, "int4"), dtype=dtype,
                                                    device="cpu"))
        del w
    state = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            state[name] = (torch.ones(p.shape, dtype=dtype) if name.endswith("norm.weight")
                           else torch.randn(p.shape, dtype=dtype))
    model.load_state_dict(state, strict=False, assign=True)
    for name, buf in model.named_buffers():
        assert not buf.is_meta, name
    tok = MistralTokenizer.for_vocab(config.vocab_size)
    return LLM(model.eval(), config, tok, Path(f"random-int4:{preset}"), kv_cache_memory)
