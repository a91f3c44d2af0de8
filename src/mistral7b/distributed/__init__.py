"""Scale-out on torch.distributed: starting ranks, joining the group (runtime.py), and tensor-
parallel inference: the shard math (tp.py), shard-wise checkpoint readers (tp_weights.py),
rank 0 driving the other ranks' shards (tp_model.py).

FSDP2 fine-tuning builds on `runtime` too; nothing here runs at import.
"""
