"""Scale-out on torch.distributed: starting ranks, joining the group (runtime.py).

Tensor-parallel inference and FSDP2 fine-tuning build on `runtime`; nothing here runs at import.
"""
