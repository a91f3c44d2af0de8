"""Weight-only quantization as module swaps: int8 per channel, int4 per group.

    from mistral7b.quant import load_quantized, quantize_model
    model = load_quantized(reader, "int4", dtype=torch.bfloat16, device="cpu")  # from a file
    quantize_model(model, "int8")                                             # in memory

- layers.py: `Int8Linear` / `Int4Linear` (PyTorch's CPU weight-only kernels) and the
  float -> integer quantizers, over a portable weight form (`Int8Weight`, `Int4Weight`);
- gguf_import.py: GGUF Q4_0 / Q4_1 / Q4_K blocks copied into int4 without a float round trip;
- convert.py: one source tensor (float, GGUF blocks) -> one int8/int4 weight;
- load.py: the quantize-on-load path, one tensor at a time (peak ~ the quantized model);
- checkpoint.py: the safetensors checkpoint `mistral7b quantize` writes and `load()` reads;
- memory.py: handing the mapped pages of consumed source tensors back to the kernel.

model.py knows nothing of this package.
"""

from mistral7b.quant.checkpoint import stored_quant, write_quantized
from mistral7b.quant.convert import AUTO, QUANT_MODES, check_mode, file_mode
from mistral7b.quant.layers import (
    Int4Linear,
    Int4Weight,
    Int8Linear,
    Int8Weight,
    quantize_int4,
    quantize_int8,
)
from mistral7b.quant.load import load_quantized, quantize_model

__all__ = [
    "AUTO",
    "QUANT_MODES",
    "Int4Linear",
    "Int4Weight",
    "Int8Linear",
    "Int8Weight",
    "check_mode",
    "file_mode",
    "load_quantized",
    "quantize_int4",
    "quantize_int8",
    "quantize_model",
    "stored_quant",
    "write_quantized",
]
