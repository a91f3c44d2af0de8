"""Build the Transformer on the meta device and fill it by assignment from a reader.

No parameter is ever allocated twice: the meta model has no storage, and each tensor from the
reader (memory-mapped when the format allows) is converted only when its dtype or device
differs from the target, then assigned in place of the meta parameter.
"""

from __future__ import annotations

import math

import torch

from mistral7b import progress
from mistral7b.errors import ModelFileError, ResourceError
from mistral7b.model import Transformer
from mistral7b.weights.base import CheckpointReader
from mistral7b.weights.names import expected_shapes

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def build_model(reader: CheckpointReader, *, dtype: torch.dtype,
                device: torch.device) -> Transformer:
    config = reader.config
    check_tensors(reader)
    with torch.device("meta"):
        model = Transformer(config)
    state = {}
    shapes = expected_shapes(config)
    tensors = progress.bar(shapes.items(), total=len(shapes), desc="loading", unit="tensor",
                           show=progress.big(reader.size_bytes()))
    for name, shape in tensors:
        try:
            tensor = reader.tensor_as(name, dtype)
            if tensor.dtype not in _FLOAT_DTYPES:
                raise ModelFileError(reader.source(name),
                                     f"tensor {name!r} has dtype {tensor.dtype}, expected floats")
            if tensor.dtype != dtype or tensor.device != device:
                tensor = tensor.to(device=device, dtype=dtype)
        except (RuntimeError, MemoryError) as exc:
            if not _out_of_memory(exc):
                raise
            raise weights_allocation_error(reader, name, shape, dtype, device, exc) from None
        state[name] = tensor
    if config.tied_embeddings:
        state["output.weight"] = state["tok_embeddings.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tied_embeddings:
        model.output.weight = model.tok_embeddings.weight
    model.requires_grad_(False)
    return model.eval()


def check_tensors(reader: CheckpointReader) -> None:
    """Every tensor the config needs is present with the right shape; say which one is not."""
    config = reader.config
    present = reader.names()
    for name, want in expected_shapes(config).items():
        if name not in present:
            raise ModelFileError(reader.path, f"tensor {name!r} is missing from the checkpoint")
        got = tuple(reader.shape(name))
        if got != want:
            raise ModelFileError(
                reader.source(name),
                f"tensor {name!r} has shape {list(got)} but the config (dim={config.dim}, "
                f"n_heads={config.n_heads}, n_kv_heads={config.n_kv_heads}, head_dim="
                f"{config.head_dim}, hidden_dim={config.hidden_dim}, vocab_size="
                f"{config.vocab_size}) needs {list(want)}")


def _out_of_memory(exc: BaseException) -> bool:
    text = str(exc).lower()
    return (isinstance(exc, (MemoryError, torch.OutOfMemoryError))
            or "out of memory" in text or "can't allocate memory" in text)


def weights_allocation_error(reader: CheckpointReader, name: str, shape: tuple[int, ...],
                             dtype: torch.dtype, device: torch.device,
                             exc: BaseException) -> ResourceError:
    """The error for weights that do not fit: which tensor, how many bytes, what to change."""
    elem = torch.empty((), dtype=dtype).element_size()
    n_bytes = elem * math.prod(shape)
    total = elem * reader.config.n_params
    return ResourceError(
        f"{reader.source(name)}: could not allocate tensor {name!r} {list(shape)} in {dtype} "
        f"({n_bytes} bytes) on {device}; the whole model needs about {total} bytes "
        f"({total / 2**30:.2f} GiB) in {dtype} (the allocator said: {str(exc).strip()[:200]}). "
        "Load it quantized (quant='int8' or 'int4'; CLI: --quant int8 / --quant int4) or in "
        "a smaller dtype (dtype='bfloat16'; CLI: --dtype bf16)")
