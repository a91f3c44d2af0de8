"""LoRA (Hu et al. 2021) as module swaps, QLoRA over a frozen integer base, adapter files.

    y = W x + scale * B (A dropout(x))        A: (r, in), B: (out, r), scale = alpha / r

- layers.py: `LoRALinear` and the frozen integer bases of QLoRA (`FrozenQuantLinear`);
- apply.py: which linears are adapted, and the swaps in and out of a model
  (`apply_lora`, `merge_lora`, `remove_lora`, `quantize_frozen`);
- files.py: PEFT and Mistral adapter files (`read_adapter`, `save_peft`, `save_mistral`,
  `apply_lora_file`).

model.py knows nothing of LoRA: every change to a model is a module swap (modules.py).
"""

from mistral7b.lora.apply import (
    HF_TARGETS,
    TARGETS,
    apply_lora,
    lora_modules,
    lora_parameters,
    lora_state_dict,
    merge_lora,
    quantize_frozen,
    remove_lora,
    target_names,
    wrap_quantized_outside_lora,
)
from mistral7b.lora.files import (
    MISTRAL_DEFAULT_SCALING,
    Adapter,
    adapter_from_model,
    apply_adapter,
    apply_lora_file,
    read_adapter,
    save_mistral,
    save_peft,
)
from mistral7b.lora.layers import (
    FrozenQuantLinear,
    InputGradLinear,
    LoRALinear,
    frozen_linear,
    is_frozen_quantized,
)

__all__ = [
    "HF_TARGETS", "MISTRAL_DEFAULT_SCALING", "TARGETS", "Adapter", "FrozenQuantLinear",
    "InputGradLinear", "LoRALinear", "adapter_from_model", "apply_adapter", "apply_lora",
    "apply_lora_file", "frozen_linear", "is_frozen_quantized", "lora_modules",
    "lora_parameters", "lora_state_dict", "merge_lora", "quantize_frozen", "read_adapter",
    "remove_lora", "save_mistral", "save_peft", "target_names", "wrap_quantized_outside_lora",
]
