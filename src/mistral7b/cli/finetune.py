"""`mistral7b finetune`: LoRA / QLoRA fine-tuning on a JSONL file.

    mistral7b finetune -m MODEL --data train.jsonl --eval-data val.jsonl -o out/ --steps 200
    mistral7b finetune --data train.jsonl --check            (validate the data, then stop)
    mistral7b finetune --data train.jsonl -o out/ --resume   (continue an interrupted run)
    mistral7b finetune --data train.jsonl -o out/ --nproc 2  (FSDP2 over 2 local processes)
    torchrun --nnodes 2 --nproc-per-node 8 ... -m mistral7b.cli.main finetune ...   (many)

Lines are {"messages": [...]} (chat: loss on the assistant's tokens) or {"text": ...}. The
adapter is written to OUT as PEFT (adapter_config.json + adapter_model.safetensors) and as
Mistral's lora.safetensors; OUT/checkpoint/ is the resume point, on any number of ranks.
Progress (loss, tokens/s, ETA) goes to stderr, from rank 0; Ctrl-C saves a checkpoint first.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mistral7b.cli import common
from mistral7b.errors import InputError


def add_parser(subparsers: Any) -> None:
    from mistral7b.finetune.trainer import TrainConfig
    from mistral7b.lora import TARGETS

    d = TrainConfig()  # flag defaults come from the config: one source of truth
    p = subparsers.add_parser(
        "finetune", help="LoRA / QLoRA fine-tuning on JSONL data",
        description="Fine-tune a LoRA adapter. DATA is JSONL, one example a line: "
                    '{"messages": [{"role": "user", "content": ...}, {"role": "assistant", '
                    '"content": ...}]} (loss on the assistant\'s tokens only) or {"text": ...}. '
                    "The adapter is saved in OUT in PEFT and Mistral formats.")
    g = p.add_argument_group("data")
    g.add_argument("--data", required=True, metavar="FILE", help="training data (JSONL)")
    g.add_argument("--eval-data", metavar="FILE", help="held-out data for eval loss/perplexity")
    g.add_argument("--seq-len", type=int, default=d.seq_len, metavar="N",
                   help="tokens per row; longer examples are cut (default: %(default)s)")
    g.add_argument("--no-pack", dest="pack", action="store_false",
                   help="one example per row, batches of similar length (default: pack short "
                        "examples into rows, each attending only to itself)")
    g.add_argument("--check", action="store_true",
                   help="validate and tokenize the data, print its statistics, and stop")

    g = p.add_argument_group("LoRA")
    g.add_argument("--rank", "-r", type=int, default=d.rank, metavar="R",
                   help="LoRA rank (default: %(default)s)")
    g.add_argument("--alpha", type=float, default=d.alpha,
                   help="LoRA alpha; the update is scaled by alpha/rank (default: %(default)g)")
    g.add_argument("--dropout", type=float, default=d.dropout, metavar="P",
                   help="dropout on the LoRA input (default: %(default)g)")
    g.add_argument("--targets", default=",".join(TARGETS), metavar="LIST",
                   help="linear layers to adapt, from " + ",".join(TARGETS) +
                        " (default: all)")
    g.add_argument("--qlora", choices=("int8", "int4"),
                   help="QLoRA: quantize the frozen base weights (int8 per channel or int4 in "
                        "groups of 64, dequantized on the fly) and train LoRA over them")

    g = p.add_argument_group("optimization")
    g.add_argument("--steps", type=int, metavar="N",
                   help="optimizer steps (default: --epochs passes over the data)")
    g.add_argument("--epochs", type=float, default=d.epochs, metavar="E",
                   help="passes over the data when --steps is not given (default: %(default)g)")
    g.add_argument("--lr", type=float, default=d.lr,
                   help="peak learning rate of AdamW (default: %(default)g)")
    g.add_argument("--warmup", type=int, metavar="N",
                   help="linear warm-up steps, then cosine decay (default: 5%% of the steps)")
    g.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio, metavar="X",
                   help="final learning rate as a fraction of --lr (default: %(default)g)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, metavar="X",
                   help="AdamW weight decay (default: %(default)g)")
    g.add_argument("--grad-clip", type=float, default=d.grad_clip, metavar="X",
                   help="clip the gradient norm to X, 0 = off (default: %(default)g)")
    g.add_argument("--batch-size", "-b", type=int, default=d.batch_size, metavar="B",
                   help="rows per micro-batch, over all processes together: each takes its "
                        "share (default: %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, metavar="N",
                   help="micro-batches per optimizer step (default: %(default)s)")
    g.add_argument("--grad-checkpoint", action="store_true",
                   help="activation checkpointing: recompute activations in backward (less "
                        "memory, ~30%% more compute)")
    g.add_argument("--seed", type=int, default=d.seed, help="random seed (default: %(default)s)")
    g.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train on N local processes with FSDP2 (started under torchrun; each "
                        "holds 1/N of the float weights and optimizer state). Across machines "
                        "run torchrun yourself (README) (default: %(default)s)")

    g = p.add_argument_group("output")
    g.add_argument("-o", "--out", required=True, metavar="DIR",
                   help="folder for the adapter and the checkpoint")
    g.add_argument("--eval-every", type=int, default=0, metavar="N",
                   help="evaluate on --eval-data every N steps (default: only at the end)")
    g.add_argument("--save-every", type=int, default=0, metavar="N",
                   help="write a checkpoint every N steps (default: only at the end)")
    g.add_argument("--resume", action="store_true",
                   help="continue from OUT/checkpoint with the same settings and data (on "
                        "any number of processes)")
    g.add_argument("--json", action="store_true",
                   help="print a JSON summary on stdout at the end")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar or messages")
    common.add_model_args(p, quant_default="none")
    p.set_defaults(run=run, finetune_parser=p)


def config_from_args(args: argparse.Namespace) -> Any:
    from mistral7b.finetune.trainer import TrainConfig

    config = TrainConfig(
        steps=args.steps, epochs=args.epochs, lr=args.lr, warmup=args.warmup,
        min_lr_ratio=args.min_lr_ratio, weight_decay=args.weight_decay,
        grad_clip=args.grad_clip, batch_size=args.batch_size, grad_accum=args.grad_accum,
        seq_len=args.seq_len, pack=args.pack, rank=args.rank, alpha=args.alpha,
        dropout=args.dropout, targets=tuple(t.strip() for t in args.targets.split(",")),
        qlora={"int8": 8, "int4": 4}.get(args.qlora), grad_checkpoint=args.grad_checkpoint,
        eval_every=args.eval_every, save_every=args.save_every, seed=args.seed)
    config.check()
    if args.warmup is not None and args.warmup < 0:
        raise InputError(f"--warmup must be >= 0, got {args.warmup}")
    return config


def run(args: argparse.Namespace) -> int:
    from mistral7b.distributed.runtime import launch_local, this_rank, under_torchrun
    from mistral7b.finetune import read_records, tokenize
    from mistral7b.finetune.checkpoint import checkpoint_exists, read_progress
    from mistral7b.finetune.trainer import Trainer

    # Everything that can be checked without the model is checked before loading it.
    config = config_from_args(args)
    if args.quant != "none" and args.qlora:
        raise InputError("--quant quantizes at load, --qlora after it: give one of them")
    if args.nproc < 1:
        raise InputError(f"--nproc must be >= 1, got {args.nproc}")
    rank = this_rank()
    if under_torchrun() and args.nproc not in (1, rank.world_size):
        raise InputError(f"--nproc {args.nproc} under torchrun, which started "
                         f"{rank.world_size} processes: leave --nproc out there")
    train_records = read_records(args.data)
    eval_records = read_records(args.eval_data) if args.eval_data else None
    out = Path(args.out)
    if not args.check:
        if checkpoint_exists(out) and not args.resume:
            raise InputError(f"{out} already holds a checkpoint: pass --resume to continue it, "
                             "or choose another --out")
        if args.resume:
            read_progress(out)
        if args.nproc > 1 and not under_torchrun():
            return launch_local(args.nproc, _argv_for_ranks(args))
    if under_torchrun() and rank.world_size > 1:
        args.quiet = args.quiet or not rank.is_main      # one voice: rank 0's
        args.json = args.json and rank.is_main
        args.device = _rank_device(args.device, rank.local_rank)

    llm = common.load_model(args, quiet=args.quiet)
    tokenizer = llm.require_tokenizer()
    train, cut = tokenize(train_records, tokenizer, max_len=config.seq_len, path=args.data)
    evals = None
    if eval_records is not None:
        evals, _ = tokenize(eval_records, tokenizer, max_len=config.seq_len,
                            path=args.eval_data)
    stats = _data_stats(train, cut, config.seq_len)
    if not args.quiet or args.check:
        common.log(f"{args.data}: {stats}")
    if args.check:
        return 0

    trainer = Trainer(llm, config, out, progress=not args.quiet)
    if not args.quiet:
        total = trainer.total_steps(train)
        common.log(f"training {total} steps: LoRA rank {config.rank}, alpha {config.alpha:g} on "
                   f"{','.join(config.targets)}" + (f", QLoRA {args.qlora} base"
                                                    if config.qlora else ""))
    try:
        result = trainer.fit(train, evals, resume=args.resume)
    except KeyboardInterrupt:
        if trainer.ranks.is_main:
            common.log(f"interrupted at step {trainer.step}: checkpoint and adapter saved in "
                       f"{out}; continue with --resume")
        return common.EXIT_INTERRUPTED
    memory = common.peak_memory()
    summary = {
        "steps": result.steps,
        "first_loss": result.losses[0] if result.losses else None,
        "final_loss": result.losses[-1] if result.losses else None,
        "eval": [{"step": s, "loss": lo, "perplexity": pp} for s, lo, pp in result.evals],
        "tokens": result.tokens,
        "seconds": round(result.seconds, 3),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "out": str(out),
        **{k: round(v, 1) for k, v in memory.items()},
        "ranks": trainer.ranks.world,
        "peak_rss_mib_per_rank": [round(v, 1) for v in trainer.ranks.gather(
            memory["peak_rss_mib"])],
    }
    if args.json:
        print(json.dumps(summary))
    if not args.quiet:
        losses = (f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}"
                  if result.losses else "no steps run")
        common.log(f"done: {result.steps} steps, {losses}, {summary['tokens_per_second']} "
                   f"tok/s, peak RSS {summary['peak_rss_mib']:.0f} MiB | adapter in {out} "
                   "(PEFT + Mistral lora.safetensors)")
    return 0


def _argv_for_ranks(args: argparse.Namespace) -> list[str]:
    """The command line that asks for what `args` holds, without --nproc: what each local
    rank runs under torchrun."""
    argv = ["finetune"]
    for action in args.finetune_parser._actions:
        if not action.option_strings or action.dest in ("help", "nproc"):
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = max(action.option_strings, key=len)      # the long form
        if action.nargs == 0:                            # store_true / store_false
            argv.append(flag)
        elif isinstance(value, list):                    # append
            for v in value:
                argv += [flag, str(v)]
        else:
            argv += [flag, str(value)]
    return argv


def _rank_device(device: str | None, local_rank: int) -> str | None:
    """Each local rank on its own GPU (cuda:LOCAL_RANK) where there are GPUs."""
    import torch

    if device == "cpu" or (device is None and not torch.cuda.is_available()):
        return device
    if device not in (None, "cuda"):
        raise InputError(f"--device {device} under torchrun: give cpu or cuda; each process "
                         "takes the GPU of its local rank")
    if local_rank >= torch.cuda.device_count():
        raise InputError(f"local rank {local_rank} has no GPU of its own (this machine has "
                         f"{torch.cuda.device_count()}): start at most that many processes "
                         "per machine, or train on the CPU with --device cpu")
    return f"cuda:{local_rank}"


def _data_stats(examples: Sequence[Any], cut: int, seq_len: int) -> str:
    tokens = sum(len(e) for e in examples)
    targets = sum(e.n_targets for e in examples)
    text = f"{len(examples)} examples, {tokens} tokens, {targets} trained on"
    if cut:
        text += f"; {cut} cut to {seq_len} tokens (raise --seq-len to keep them whole)"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral7b.cli.finetune ...`: this command alone, with the CLI's error handling."""
    from mistral7b.cli.main import main as cli_main

    return cli_main(["finetune", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
