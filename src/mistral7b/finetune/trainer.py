"""The LoRA / QLoRA training loop: AdamW with warm-up and cosine decay, gradient accumulation,
activation checkpointing, periodic evaluation, atomic checkpoints, resume and Ctrl-C, on one
process or on several under torchrun (FSDP2, sharding.py; checkpoints through
torch.distributed.checkpoint, checkpoint.py, so a run resumes on another number of ranks).

Only LoRA weights get gradients: the loaded model is frozen (and may be memory-mapped); its
forward runs without a cache on packed rows (batching.py), and the loss is the mean
cross-entropy over the target tokens of all micro-batches of a step. The model's dtype is the
training dtype of the frozen base (bfloat16 where it helps: the CUDA default of `load`);
LoRA weights and optimizer state are always float32.

QLoRA, two ways: `qlora=8|4` quantizes the loaded float base into lora.FrozenQuantLinear
(dequantized on the fly, cheaply, in forward and backward); or the model comes from
`load(quant="int8")` (mistral7b.quant's Int8Linear kernels) and LoRA trains over it as is.

Layout of the output folder (adapters written once, by rank 0, from the whole tensors):

    checkpoint/                 training state (LoRA, AdamW; step, losses: trainer.json)
    adapter_config.json         } PEFT adapter (HF names, q/k B rows in HF's rotary layout)
    adapter_model.safetensors   }
    lora.safetensors            } Mistral (mistral-finetune) adapter, with lora.scaling in
    params.json                 } params.json

Every file is written to a temporary name and renamed, so an interrupted write never leaves a
half file where a good one was. Each step reseeds torch's generator from (seed, step, rank)
before dropout draws its masks, so a resumed run draws what an uninterrupted one would (on the
same number of ranks) without saving generator states.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from mistral7b.errors import InputError
from mistral7b.finetune.batching import IGNORE, Batch, epoch_rows, make_batch
from mistral7b.finetune.checkpoint import (
    CHECKPOINT,
    load_checkpoint,
    read_progress,
    save_checkpoint,
)
from mistral7b.finetune.data import Example, fingerprint
from mistral7b.finetune.sharding import Ranks, full_lora_tensors, gradient_sync, shard_model
from mistral7b.lora import (
    TARGETS,
    adapter_from_model,
    apply_lora,
    lora_parameters,
    quantize_frozen,
    save_mistral,
    save_peft,
    wrap_quantized_outside_lora,
)

if TYPE_CHECKING:
    from mistral7b.api import LLM

__all__ = ["CHECKPOINT", "StepInfo", "TrainConfig", "TrainResult", "Trainer", "lr_factor"]

# Settings that shape the trajectory: a resumed run must use the same ones.
_RESUME_KEYS = ("steps", "lr", "warmup", "min_lr_ratio", "weight_decay", "grad_clip",
                "batch_size", "grad_accum", "seq_len", "pack", "rank", "alpha", "dropout",
                "targets", "qlora", "seed")


@dataclass
class TrainConfig:
    steps: int | None = None        # optimizer steps; None: `epochs` passes over the data
    epochs: float = 1.0
    lr: float = 2e-4                # peak learning rate (after warm-up)
    warmup: int | None = None       # warm-up steps; None: 5% of the steps (at least 1)
    min_lr_ratio: float = 0.1       # the cosine decays to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    grad_clip: float = 1.0          # max global gradient norm; 0 disables clipping
    batch_size: int = 4             # rows per micro-batch, over all ranks together
    grad_accum: int = 1             # micro-batches per optimizer step
    seq_len: int = 512              # tokens per row (examples are cut to this length)
    pack: bool = True               # pack short examples into rows (else bucket by length)
    rank: int = 16
    alpha: float = 32.0             # LoRA scale = alpha / rank
    dropout: float = 0.0            # dropout on the LoRA branch's input
    targets: tuple[str, ...] = TARGETS
    qlora: int | None = None        # 8 or 4: quantize the frozen base first (QLoRA)
    grad_checkpoint: bool = False   # recompute each block's activations in backward
    eval_every: int = 0             # steps between evaluations (0: only at the end)
    save_every: int = 0             # steps between checkpoints (0: only at the end / Ctrl-C)
    seed: int = 0

    def check(self) -> None:
        def positive(name: str) -> None:
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")

        for name in ("batch_size", "grad_accum", "seq_len", "rank"):
            positive(name)
        if self.steps is not None:
            positive("steps")
        if not self.epochs > 0:
            raise InputError(f"epochs must be > 0, got {self.epochs}")
        if not self.lr > 0:
            raise InputError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise InputError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.qlora not in (None, 4, 8):
            raise InputError(f"qlora must be 8 or 4 bits, got {self.qlora}")
        unknown = [t for t in self.targets if t not in TARGETS]
        if unknown or not self.targets:
            raise InputError(f"unknown LoRA target(s) {unknown}: choose from "
                             f"{', '.join(TARGETS)}")


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based) of `total`.

    Linear warm-up over `warmup` steps (1/w, 2/w, ... 1), then a cosine from 1 down to
    min_ratio at the last step. E.g. total=10, warmup=2: 0.5, 1.0, 1.0, 0.97, ..., min_ratio.
    """
    if step < warmup:
        return (step + 1) / warmup
    span = total - warmup - 1
    if span <= 0:
        return 1.0
    progress = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@dataclass
class StepInfo:
    step: int                 # optimizer steps done (1-based after the first)
    loss: float               # mean target-token loss of this step
    lr: float
    tokens_per_second: float  # real tokens (packed rows, no padding) over wall time


@dataclass
class TrainResult:
    steps: int
    losses: list[float]                               # one per step, from step 1
    evals: list[tuple[int, float, float]] = field(default_factory=list)  # (step, loss, ppl)
    tokens: int = 0
    seconds: float = 0.0
    out_dir: Path | None = None

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


class Trainer:
    """Fine-tunes an LLM (from `mistral7b.load`) with LoRA; see the module docstring.

    Under torchrun with several processes each rank builds its Trainer the same way (same
    model file, config and data) and the model is sharded with FSDP2 (sharding.py); progress
    and logs come from rank 0 only.
    """

    def __init__(self, llm: LLM, config: TrainConfig, out_dir: str | Path, *,
                 progress: bool = True) -> None:
        config.check()
        self.llm = llm
        self.model = llm.model
        self.config = config
        self.out_dir = Path(out_dir)
        self.device = llm.device
        self.ranks = Ranks.start(self.device)
        self.progress = progress and self.ranks.is_main
        self.window = llm.config.sliding_window
        torch.manual_seed(config.seed)
        _refuse_slow_int4(self.model)
        if config.qlora:
            quantize_frozen(self.model, bits=config.qlora, targets=config.targets)
        apply_lora(self.model, rank=config.rank, alpha=config.alpha, dropout=config.dropout,
                   targets=config.targets)
        # A model loaded with quant= has integer layers outside LoRA too (the output): let
        # gradients pass through them.
        wrap_quantized_outside_lora(self.model)
        if self.ranks.sharded:
            shard_model(self.model, self.ranks)   # every rank started from the same weights
        self.params = lora_parameters(self.model)
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, betas=(0.9, 0.999),
                                           eps=1e-8, weight_decay=config.weight_decay)
        self.step = 0
        self.losses: list[float] = []
        self.evals: list[tuple[int, float, float]] = []
        self.tokens = 0
        self._epochs: dict[int, list[list[list[int]]]] = {}

    # ------------------------------------------------------------------ schedule

    def total_steps(self, examples: Sequence[Example]) -> int:
        c = self.config
        if c.steps is not None:
            return c.steps
        per_epoch = len(self._epoch(examples, 0))
        return max(1, math.ceil(c.epochs * per_epoch / c.grad_accum))

    def warmup_steps(self, total: int) -> int:
        w = self.config.warmup
        return max(1, round(0.05 * total)) if w is None else w

    def _epoch(self, examples: Sequence[Example], epoch: int) -> list[list[list[int]]]:
        if epoch not in self._epochs:
            c = self.config
            self._epochs[epoch] = epoch_rows(examples, seq_len=c.seq_len,
                                             batch_size=c.batch_size, pack=c.pack,
                                             seed=c.seed, epoch=epoch)
        return self._epochs[epoch]

    def _micro_batches(self, examples: Sequence[Example], step: int) -> list[list[list[int]]]:
        """The rows of the micro-batches of optimizer step `step` (0-based): a pure function
        of (data, seed, step), which is what makes resuming exact."""
        out = []
        for m in range(step * self.config.grad_accum, (step + 1) * self.config.grad_accum):
            epoch = 0
            while m >= len(self._epoch(examples, epoch)):
                m -= len(self._epoch(examples, epoch))
                epoch += 1
            out.append(self._epoch(examples, epoch)[m])
        return out

    # ------------------------------------------------------------------ compute

    def _local_batch(self, examples: Sequence[Example],
                     rows: list[list[int]]) -> tuple[Batch, int]:
        """This rank's part of a micro-batch and its loss weight (sharding.py)."""
        mine, weight = self.ranks.local_rows(rows)
        return make_batch(examples, mine, self.window, self.device), weight

    def _loss_sum(self, batch: Batch) -> torch.Tensor:
        logits = self.model(batch.tokens, batch.positions, None, batch.plan,
                            logits_index=batch.logits_index)               # (B, n, V) float32
        return F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(),
                               ignore_index=IGNORE, reduction="sum")

    def train_step(self, examples: Sequence[Example], total: int) -> StepInfo:
        c = self.config
        t0 = time.perf_counter()
        self.model.train()
        torch.manual_seed(_step_seed(c.seed, self.step, self.ranks.rank))  # dropout masks
        micro = self._micro_batches(examples, self.step)   # the global batch, on every rank
        n_targets = sum(_row_targets(examples, rows) for rows in micro)
        n_tokens = sum(len(examples[i]) for rows in micro for row in rows for i in row)
        loss_local = 0.0
        with activation_checkpointing(self.model, c.grad_checkpoint):
            for m, rows in enumerate(micro):
                batch, weight = self._local_batch(examples, rows)
                gradient_sync(self.model, m == len(micro) - 1)
                loss = self._loss_sum(batch) * (weight / n_targets)
                loss.backward()
                loss_local += loss.item() / self.ranks.world
        (loss_total,) = self.ranks.sum([loss_local])
        if c.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, c.grad_clip)
        lr = c.lr * lr_factor(self.step, total, self.warmup_steps(total), c.min_lr_ratio)
        # never leave a half-applied update behind (ranks: _held_stop_signals)
        with _deferred_interrupts(not self.ranks.sharded):
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            self.losses.append(loss_total)
            self.tokens += n_tokens
        self.model.eval()
        return StepInfo(self.step, loss_total, lr, n_tokens / (time.perf_counter() - t0))

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> tuple[float, float]:
        """(mean target-token loss, perplexity) over `examples`."""
        self.model.eval()
        c = self.config
        total, count = 0.0, 0
        for rows in epoch_rows(examples, seq_len=c.seq_len, batch_size=c.batch_size,
                               pack=c.pack, seed=0, epoch=0):
            batch, weight = self._local_batch(examples, rows)
            total += self._loss_sum(batch).item() * (weight > 0)
            count += _row_targets(examples, rows)
        (total,) = self.ranks.sum([total])
        loss = total / max(count, 1)
        return loss, math.exp(min(loss, 700.0))

    # ------------------------------------------------------------------ the loop

    def fit(self, examples: Sequence[Example], eval_examples: Sequence[Example] | None = None,
            *, resume: bool = False,
            on_step: Callable[[StepInfo], None] | None = None) -> TrainResult:
        """Train to the configured number of steps; with resume, continue from the checkpoint.

        Ctrl-C (KeyboardInterrupt) saves a checkpoint of the last finished step and the
        adapters, then propagates. On several ranks a SIGINT / SIGTERM is held to the end of
        the step, the ranks agree on it, and all save together.
        """
        if not examples:
            raise InputError("no training examples")
        data_id = fingerprint(examples)
        self.ranks.check_same(data_id, "training data")
        self.ranks.check_same(repr(sorted(_config_dict(self.config).items())), "settings")
        total = self.total_steps(examples)
        if resume:
            self.load_checkpoint(data_id)
        from tqdm import tqdm

        bar = tqdm(total=total, initial=self.step, desc="finetune", unit="step",
                   file=sys.stderr, disable=not self.progress, dynamic_ncols=True)
        t_start, tokens_start = time.perf_counter(), self.tokens
        result = TrainResult(self.step, self.losses, self.evals, out_dir=self.out_dir)
        try:
            with _held_stop_signals(self.ranks.sharded) as stop:
                while self.step < total:
                    info = self.train_step(examples, total)
                    elapsed = time.perf_counter() - t_start
                    bar.set_postfix(loss=f"{info.loss:.4f}", lr=f"{info.lr:.2e}",
                                    tok_s=f"{(self.tokens - tokens_start) / elapsed:.0f}")
                    bar.update(1)
                    c = self.config
                    if eval_examples and c.eval_every and self.step % c.eval_every == 0 \
                            and self.step < total:
                        self._evaluate_and_log(eval_examples, bar)
                    if c.save_every and self.step % c.save_every == 0 and self.step < total:
                        self.save(data_id)
                    if on_step is not None:
                        on_step(info)
                    if self.ranks.sharded and self.ranks.any(bool(stop)):
                        raise KeyboardInterrupt
            if eval_examples:
                self._evaluate_and_log(eval_examples, bar)
            self.save(data_id)
        except KeyboardInterrupt:
            self.optimizer.zero_grad(set_to_none=True)
            self.model.eval()
            self.save(data_id)
            raise
        finally:
            bar.close()
            result.steps = self.step
            result.tokens = self.tokens - tokens_start
            result.seconds = time.perf_counter() - t_start
        return result

    def _evaluate_and_log(self, eval_examples: Sequence[Example], bar: Any) -> None:
        loss, ppl = self.evaluate(eval_examples)
        self.evals.append((self.step, loss, ppl))
        if self.progress:
            bar.write(f"step {self.step}: eval loss {loss:.4f}, perplexity {ppl:.2f}",
                      file=sys.stderr)

    # ------------------------------------------------------------------ files

    def save(self, data_id: str) -> None:
        """The checkpoint (every rank its shards) and both adapter formats (rank 0, whole
        tensors), each written atomically. Every rank must call it."""
        progress = {
            "step": self.step,
            "losses": list(self.losses),
            "evals": [list(e) for e in self.evals],
            "tokens": self.tokens,
            "config": _config_dict(self.config),
            "data": data_id,
            "world_size": self.ranks.world,
        }
        # A Ctrl-C waits for the save's end (DCP's writer threads would turn it into an error)
        with _deferred_interrupts(not self.ranks.sharded):
            save_checkpoint(self.out_dir, self.model, self.optimizer, progress, self.ranks)
            tensors = full_lora_tensors(self.model, self.ranks)
            if self.ranks.is_main:
                adapter = adapter_from_model(self.model, alpha=self.config.alpha,
                                             dropout=self.config.dropout, tensors=tensors)
                save_peft(adapter, self.out_dir, self.llm.config,
                          base_model=str(self.llm.path))
                save_mistral(adapter, self.out_dir, self.llm.config)
            self.ranks.barrier()

    def load_checkpoint(self, data_id: str) -> None:
        """Continue from OUT/checkpoint, written by a run on any number of ranks."""
        state = read_progress(self.out_dir)
        saved, now = state.get("config", {}), _config_dict(self.config)
        changed = [k for k in _RESUME_KEYS if saved.get(k) != now.get(k)]
        if changed:
            detail = ", ".join(f"{k}: {saved.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise InputError(f"--resume: the settings differ from the checkpoint's ({detail}); "
                             "resume with the same settings")
        if state.get("data") != data_id:
            raise InputError("--resume: the training data differ from the checkpoint's")
        load_checkpoint(self.out_dir, self.model, self.optimizer, self.ranks)
        self.step = int(state["step"])
        self.losses[:] = [float(x) for x in state["losses"]]
        self.evals[:] = [(int(e[0]), float(e[1]), float(e[2])) for e in state["evals"]]
        self.tokens = int(state["tokens"])


def _step_seed(seed: int, step: int, rank: int) -> int:
    return ((seed * 1_000_003 + step) * 1009 + rank) % (1 << 63)


def _row_targets(examples: Sequence[Example], rows: list[list[int]]) -> int:
    """Tokens whose loss counts in these rows (make_batch's rule: the first of an example is
    never predicted)."""
    return sum(sum(examples[i].targets[1:]) for row in rows for i in row)


def _refuse_slow_int4(model: Any) -> None:
    """mistral7b.quant's Int4Linear on PyTorch's CPU kernel can only read its weights back
    through that kernel (one identity matmul per column block): a backward pass would take
    minutes. (On our own kernel it reads them back cheaply.)"""
    for name, module in model.named_modules():
        if getattr(module, "dequantize_is_slow", False):
            raise InputError(f"{name}: LoRA training over a model loaded with quant='int4' is "
                             "impractically slow on the CPU; load it without quant and use "
                             "qlora=4 (--qlora int4), which dequantizes cheaply")


def _config_dict(config: TrainConfig) -> dict[str, Any]:
    d = dataclasses.asdict(config)
    d["targets"] = list(config.targets)
    return d


@contextlib.contextmanager
def activation_checkpointing(model: Any, enabled: bool = True) -> Iterator[None]:
    """Recompute each block's activations during backward instead of keeping them: memory
    per block drops to its input, for about one extra forward. The blocks' `forward` is
    wrapped on the instances only while the context is open; module names do not change."""
    if not enabled:
        yield
        return
    blocks = list(model.layers)
    for block in blocks:
        block.forward = functools.partial(checkpoint, block.forward, use_reentrant=False)
    try:
        yield
    finally:
        for block in blocks:
            del block.forward  # back to the class's method


@contextlib.contextmanager
def _held_stop_signals(enabled: bool) -> Iterator[list[int]]:
    """On several ranks: note SIGINT / SIGTERM (torchrun passes Ctrl-C on as SIGTERM) in the
    yielded list instead of raising, so the ranks can stop at the same step boundary."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield []
        return
    received: list[int] = []
    previous = {sig: signal.signal(sig, lambda s, _: received.append(s))
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextlib.contextmanager
def _deferred_interrupts(enabled: bool = True) -> Iterator[None]:
    """Hold a Ctrl-C that arrives inside the block until its end (main thread only)."""
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield
        return
    received = []
    previous = signal.signal(signal.SIGINT, lambda *_: received.append(True))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if received:
        raise KeyboardInterrupt

