"""`mistral7b eval ppl|mc|harness|paper`: evaluate a model.

    mistral7b eval ppl -m MODEL --file wiki.txt --window 1024 --stride 512
    mistral7b eval mc -m MODEL --data arc.jsonl --shots 5 --style letters
    mistral7b eval harness --model_args model=MODEL --tasks hellaswag --limit 100
    mistral7b eval paper -m /models/Mistral-7B-v0.1

Results go to stdout (one line, or JSON with --json); load messages go to stderr.
`--lora PATH` evaluates the model with a LoRA adapter (PEFT or Mistral format) applied.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b import progress
from mistral7b.cli import common
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.api import LLM

DEFAULT_PPL_WINDOW = 1024
DEFAULT_MAX_LENGTH = 4096


def add_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate: perplexity, multiple choice, lm-eval, the paper's table",
        description="Evaluate a model. Results go to stdout, logs to stderr.")
    sub = p.add_subparsers(title="evaluations", dest="eval_command", metavar="EVAL")

    ppl = sub.add_parser(
        "ppl", help="perplexity of a text file (sliding window)",
        description="Perplexity over a long text with a sliding window: every token is scored "
                    "once, with up to WINDOW-1 tokens of context; each window after the first "
                    "scores STRIDE new tokens. The settings are printed beside the number.")
    ppl.add_argument("-f", "--file", required=True, metavar="TEXT", help="a UTF-8 text file")
    ppl.add_argument("--window", type=int, metavar="N",
                     help=f"tokens per forward (default: the model's context, at most "
                          f"{DEFAULT_PPL_WINDOW})")
    ppl.add_argument("--stride", type=int, metavar="S",
                     help="new tokens scored per window, < N (default: N/2)")
    ppl.add_argument("--batch-size", type=int, default=4, metavar="B",
                     help="windows per forward (default: %(default)s)")
    _add_common(ppl)
    ppl.set_defaults(run=run_ppl)

    mc = sub.add_parser(
        "mc", help="multiple-choice accuracy by log-likelihood (MMLU/HellaSwag/ARC style)",
        description='Score each choice by its log-likelihood after the prompt. TASKS is JSONL: '
                    '{"question": ..., "choices": [...], "answer": INDEX, "subject": ...} or '
                    '"prompt" (verbatim context) instead of "question". Prints acc and '
                    "acc_norm (log-likelihood per character).")
    mc.add_argument("--data", required=True, metavar="TASKS", help="the questions (JSONL)")
    mc.add_argument("--shots", type=int, default=0, metavar="K",
                    help="solved examples before each question (default: %(default)s)")
    mc.add_argument("--fewshot-data", metavar="FILE",
                    help="where the shots come from (default: the other questions of --data)")
    mc.add_argument("--style", choices=("cloze", "letters"), default="cloze",
                    help="cloze: score each choice's text (HellaSwag, ARC); letters: list the "
                         "choices as A. B. ... and score the letter (MMLU) "
                         "(default: %(default)s)")
    mc.add_argument("--limit", type=int, metavar="N", help="only the first N questions")
    mc.add_argument("--batch-size", type=int, default=8, metavar="B",
                    help="sequences per forward (default: %(default)s)")
    mc.add_argument("--max-length", type=int, metavar="N",
                    help=f"longest prompt + choice; longer prompts lose their start "
                         f"(default: the model's context, at most {DEFAULT_MAX_LENGTH})")
    _add_common(mc)
    mc.set_defaults(run=run_mc)

    # Everything after `harness` is lm-eval's own command line: '+' as the only prefix makes
    # argparse hand '--tasks ...' over untouched.
    harness = sub.add_parser(
        "harness", add_help=False, prefix_chars="+",
        help="run lm-evaluation-harness with the mistral7b model (lm-eval's own flags)")
    harness.add_argument("lm_eval_args", nargs=argparse.REMAINDER)
    harness.set_defaults(run=run_harness)

    paper = sub.add_parser(
        "paper", help="the Mistral 7B paper's table (MMLU, HellaSwag, ...) beside its figures",
        description="Run MMLU 5-shot, HellaSwag, WinoGrande, PIQA, ARC-e and ARC-c 0-shot with "
                    "lm-evaluation-harness (datasets from the HF hub or its local cache) and "
                    "print the results beside the paper's.")
    _add_paper_arguments(paper)
    _add_common(paper, json_flag=False)
    paper.set_defaults(run=run_paper)
    p.set_defaults(run=lambda args: _missing_evaluation(p))


def _add_paper_arguments(p: argparse.ArgumentParser) -> None:
    from mistral7b.eval.paper import PAPER_TABLE

    p.add_argument("--tasks", metavar="LIST",
                   help="comma-separated subset: " + ",".join(r.task for r in PAPER_TABLE))
    p.add_argument("--limit", type=int, metavar="N",
                   help="score only the first N questions of each task (a quick check)")
    p.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="rows per forward (default: %(default)s)")
    p.add_argument("--include-path", metavar="DIR",
                   help="extra lm-eval task folder (e.g. tasks reading local dataset copies)")


def _add_common(p: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    if json_flag:
        p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no load message or progress bar on stderr")
    common.add_model_args(p, quant_default="none")
    p.add_argument("--lora", metavar="PATH",
                   help="apply a LoRA adapter: a PEFT folder or a Mistral lora.safetensors")
    p.add_argument("--lora-separate", action="store_true",
                   help="keep the adapter as separate LoRA layers instead of merging it")


def _missing_evaluation(p: argparse.ArgumentParser) -> int:
    p.print_help(sys.stderr)
    return common.EXIT_USAGE


def _load(args: argparse.Namespace) -> LLM:
    llm = common.load_model(args, quiet=args.quiet)
    if args.lora:
        from mistral7b.lora import apply_lora_file

        apply_lora_file(llm, args.lora, merge=not args.lora_separate)
    return llm


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")


def run_ppl(args: argparse.Namespace) -> int:
    from mistral7b.eval.perplexity import check_settings, perplexity

    _positive("--batch-size", args.batch_size)
    if args.window is not None and args.stride is not None:
        check_settings(args.window, args.stride)
    text = _read_text(args.file)
    llm = _load(args)
    window = args.window or min(llm.config.max_seq_len, DEFAULT_PPL_WINDOW)
    stride = args.stride or max(1, window // 2)
    ids = llm.require_tokenizer().encode(text, bos=True)
    with progress.enabled(not args.quiet):
        result = perplexity(llm.model, ids, window=window, stride=stride,
                            batch_size=args.batch_size, sliding_window=llm.config.sliding_window)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll,
                          "tokens_scored": result.n_scored, "windows": result.n_windows,
                          "window": window, "stride": stride, "file": args.file,
                          "model": args.model, "lora": args.lora}))
    else:
        print(f"{result} | model {args.model}{_lora_note(args)} | file {args.file}")
    return 0


def run_mc(args: argparse.Namespace) -> int:
    from mistral7b.eval.multiple_choice import evaluate, read_items

    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    _positive("--max-length", args.max_length)
    if args.shots < 0:
        raise InputError(f"--shots must be >= 0, got {args.shots}")
    items = read_items(args.data)[: args.limit]
    fewshot = read_items(args.fewshot_data) if args.fewshot_data else None
    llm = _load(args)
    max_len = args.max_length or min(llm.config.max_seq_len, DEFAULT_MAX_LENGTH)
    with progress.enabled(not args.quiet):
        result = evaluate(llm.model, llm.require_tokenizer(), items, shots=args.shots,
                          fewshot=fewshot, style=args.style, max_len=max_len,
                          batch_size=args.batch_size, window=llm.config.sliding_window)
    if args.json:
        print(json.dumps({"acc": result.accuracy, "acc_norm": result.accuracy_norm,
                          "n": result.n, "shots": result.shots, "style": result.style,
                          "predictions": result.predictions, "data": args.data,
                          "model": args.model, "lora": args.lora}))
    else:
        print(f"{result} | model {args.model}{_lora_note(args)} | data {args.data}")
    return 0


def run_harness(args: argparse.Namespace) -> int:
    from mistral7b.eval.lm_eval_model import main as harness_main

    return harness_main(args.lm_eval_args)


def run_paper(args: argparse.Namespace) -> int:
    from mistral7b.eval import paper

    _positive("--batch-size", args.batch_size)
    _positive("--limit", args.limit)
    rows = paper.select_rows(args.tasks)  # check the names before loading the model
    measured = paper.evaluate(_load(args), rows, limit=args.limit, batch_size=args.batch_size,
                              include_path=args.include_path)
    print(paper.format_table(measured, rows, label="mistral7b"))
    if args.limit:
        print(f"(--limit {args.limit}: a quick check on part of each task, not comparable "
              "with the paper's figures)")
    return 0


def _lora_note(args: argparse.Namespace) -> str:
    return f" + LoRA {args.lora}" if args.lora else ""


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m mistral7b.cli.eval ...`: this command alone, with the CLI's error handling."""
    from mistral7b.cli.main import main as cli_main

    return cli_main(["eval", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
