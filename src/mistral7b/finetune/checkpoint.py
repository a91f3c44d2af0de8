"""The training checkpoint, one format for one rank or many: torch.distributed.checkpoint (DCP).

    OUT/checkpoint/.metadata       DCP's index: every tensor's global shape and where its
    OUT/checkpoint/__R_0.distcp    pieces are; one data file per rank that wrote it
    OUT/checkpoint/trainer.json    progress: step, losses, evals, tokens, settings, data id

Only the LoRA weights and AdamW's state are saved (the frozen base is the model file), in
`get_state_dict`'s names (`layers.0.attention.wq.lora_A.weight`). A run on N ranks writes
each rank's shards; DCP reads them back into any other layout, so a checkpoint of 2 ranks
resumes on 1 and one of 1 on 2 (`set_state_dict` puts the tensors into the model, sharded or
not, and the optimizer). On several machines OUT must be a shared file system.

The folder is written under a temporary name and renamed by rank 0 when every rank is done,
so an interrupted save never leaves a half checkpoint where a good one was.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from mistral7b.atomic import write_text_atomically
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.finetune.sharding import Ranks
    from mistral7b.model import Transformer

CHECKPOINT = "checkpoint"
PROGRESS = "trainer.json"
_LEGACY = "checkpoint.pt"   # the single-process format of earlier versions


def _state(model: Transformer, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(model, optimizer,
                                        options=StateDictOptions(ignore_frozen_params=True))
    # Frozen quantized bases are buffers, which ignore_frozen_params keeps: LoRA only.
    return {"model": {k: v for k, v in model_sd.items() if ".lora_" in k}, "optim": optim_sd}


def save_checkpoint(out_dir: Path, model: Transformer, optimizer: torch.optim.Optimizer,
                    progress: dict[str, Any], ranks: Ranks) -> Path:
    """Write OUT/checkpoint (every rank calls this; collective when sharded)."""
    import torch.distributed.checkpoint as dcp

    final = out_dir / CHECKPOINT
    tmp = out_dir / f".{CHECKPOINT}.tmp-step{progress['step']}"
    if ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    ranks.barrier()
    with _one_process_is_meant():
        dcp.save(_state(model, optimizer), checkpoint_id=tmp, no_dist=not ranks.sharded)
    ranks.barrier()
    if ranks.is_main:
        write_text_atomically(tmp / PROGRESS, json.dumps(progress))
        old = out_dir / f".{CHECKPOINT}.old"
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    ranks.barrier()
    return final


def read_progress(out_dir: Path) -> dict[str, Any]:
    """trainer.json of OUT/checkpoint, or a clear InputError."""
    path = out_dir / CHECKPOINT / PROGRESS
    if not path.is_file():
        if (out_dir / _LEGACY).is_file():
            raise InputError(f"--resume: {out_dir / _LEGACY} was written by an earlier "
                             "version of mistral7b in a format this one no longer reads; "
                             "start a new run in another --out")
        raise InputError(f"--resume: no {CHECKPOINT}/{PROGRESS} in {out_dir}")
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InputError(f"{path}: not a readable checkpoint ({exc})") from None
    if not isinstance(progress, dict) or not isinstance(progress.get("step"), int):
        raise InputError(f"{path}: not a checkpoint written by mistral7b finetune")
    return progress


def load_checkpoint(out_dir: Path, model: Transformer,
                    optimizer: torch.optim.Optimizer, ranks: Ranks) -> None:
    """Read OUT/checkpoint's LoRA weights and AdamW state into `model` and `optimizer`,
    resharded to this run's ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    # The optimizer's state is created (a zero step) so DCP knows what to read into.
    state = _state(model, optimizer)
    try:
        with _one_process_is_meant():
            dcp.load(state, checkpoint_id=out_dir / CHECKPOINT, no_dist=not ranks.sharded)
    except Exception as exc:  # noqa: BLE001 - DCP raises many kinds on a bad or foreign folder
        raise InputError(f"{out_dir / CHECKPOINT}: not a readable checkpoint of this run "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0][:300]})") from None
    set_state_dict(model, optimizer, model_state_dict=state["model"],
                   optim_state_dict=state["optim"],
                   options=StateDictOptions(strict=False, ignore_frozen_params=True))


@contextlib.contextmanager
def _one_process_is_meant() -> Iterator[None]:
    """DCP warns that it assumes one process when there is no group: that is what we ask."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def checkpoint_exists(out_dir: Path) -> bool:
    return (out_dir / CHECKPOINT).exists() or (out_dir / _LEGACY).exists()
