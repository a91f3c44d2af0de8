"""What several commands share: model flags, sampling flags, loading, the timing summary.

Flag values are range-checked by `SamplingParams` itself (one source of truth), before the
model loads, and its messages are re-worded with the flag's name: `--top-p 2` gives
"error: --top-p must be in (0, 1] (1 disables it), got 2.0".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.errors import InputError
from mistral7b.sampling_params import SamplingParams

if TYPE_CHECKING:
    from mistral7b.api import LLM

EXIT_USAGE = 2          # a user's mistake (argparse uses 2 too)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C

# SamplingParams field -> the flag that sets it (llama.cpp's names where it has one).
SAMPLING_FLAGS = {
    "max_tokens": "-n/--max-tokens",
    "temperature": "--temperature",
    "top_p": "--top-p",
    "top_k": "--top-k",
    "min_p": "--min-p",
    "repetition_penalty": "--repeat-penalty",
    "frequency_penalty": "--frequency-penalty",
    "presence_penalty": "--presence-penalty",
    "seed": "--seed",
    "stop": "--stop",
    "ignore_eos": "--ignore-eos",
}
_DEFAULTS = {f.name: f.default for f in dataclasses.fields(SamplingParams)}


QUANT_CHOICES = ("auto", "none", "int8", "int4")


def add_model_args(p: argparse.ArgumentParser, quant_default: str = "auto") -> None:
    """The model flags. `quant_default`: "auto" (run a quantized GGUF on its own blocks, as
    llama.cpp does) for inference commands; "none" where float is the point (fine-tuning)."""
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", default="default", metavar="MODEL",
                   help="a checkpoint folder (consolidated or HF), a .gguf file, a name in "
                        "the local store (an alias such as mistral-7b-instruct-v0.3, a pulled "
                        "Hub repository id, a name from `mistral7b create`; see `mistral7b "
                        "list`), or 'default' for the embedded SmolLM2-135M-Instruct "
                        "(default: %(default)s)")
    g.add_argument("--device", metavar="DEV",
                   help="cpu or cuda (default: cuda when available, else cpu)")
    g.add_argument("--dtype", metavar="TYPE",
                   help="float32, bfloat16 or float16 (default: bfloat16/float16 on CUDA; on "
                        "CPU float32 for small models, bfloat16 for 7B)")
    g.add_argument("--quant", choices=QUANT_CHOICES, default=quant_default,
                   help="auto: a quantized GGUF runs on its own blocks (Q4_0/Q4_1/Q8_0, and "
                        "the K-quants of Q4_K_M/Q5_K_M files), anything else "
                        "in float; none: float weights (a GGUF is dequantized); int8/int4: "
                        "quantize on load (default: %(default)s)")
    g.add_argument("--speculate", type=int, default=0, metavar="N",
                   help="speculative decoding: up to N draft tokens per step, looked up in the "
                        "prompt and answer so far and checked in one step (same output; "
                        "faster when the answer repeats its input: summaries, edits, "
                        "extraction; 0 = off, the default)")
    g.add_argument("--draft-model", metavar="MODEL",
                   help="speculative decoding with a draft model: a smaller model with the "
                        "same tokenizer (named as for -m) guesses the next tokens, the model "
                        "checks them in one step (same output; --speculate N guesses a step, "
                        "default 4 with a draft model)")
    g.add_argument("--draft-quant", choices=QUANT_CHOICES, default="auto",
                   help="the draft model's weights, as --quant (default: %(default)s)")
    g.add_argument("-t", "--threads", type=int, metavar="N",
                   help="CPU threads for PyTorch, every step (default: PyTorch's count, "
                        "lowered while measured steps show fewer threads are faster, as on "
                        "a machine where other processes keep cores busy; OMP_NUM_THREADS "
                        "also fixes it)")
    g.add_argument("--kv-cache-memory", type=parse_bytes, metavar="SIZE",
                   help="most memory the KV cache may take, e.g. 4GiB or 512MB (default: half "
                        "the memory available at start-up; 80%% of free GPU memory); memory "
                        "is taken as sequences advance, not reserved")


def add_tp_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tp", type=int, metavar="N",
                   help="tensor parallel over N processes on this machine, started under "
                        "torchrun (each holds 1/N of the weights and KV cache; rank 0 does "
                        "the I/O). Under torchrun itself N is its number of processes")


def tensor_parallel(args: argparse.Namespace) -> int | None:
    """The tp to load with: --tp N, or under torchrun the number of ranks it started."""
    from mistral7b.distributed.runtime import this_rank, under_torchrun

    if not hasattr(args, "tp"):
        return None
    if under_torchrun():
        return this_rank().world_size if args.tp is None else args.tp
    if args.tp is not None and args.tp < 1:
        raise InputError(f"--tp must be >= 1, got {args.tp}")
    return args.tp


def add_lora_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lora", dest="lora_specs", action="append", metavar="PATH[:SCALE]",
                   help="apply a LoRA adapter (a PEFT folder or a Mistral lora.safetensors), "
                        "scaled by SCALE (default 1); repeatable: the adapters add up")


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12,
          "tib": 2**40}


def parse_bytes(text: str) -> int:
    """'4GiB' -> 4294967296, '512MB' -> 512000000, '1e9' -> 1000000000."""
    import re

    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", text.lower())
    if m is None or m.group(2) not in _UNITS:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a size: use bytes or a unit, e.g. 4GiB, 512MB")
    value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: the size must be positive")
    return value


def add_sampling_args(p: argparse.ArgumentParser, *, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("-n", "--max-tokens", type=int, default=max_tokens, metavar="N",
                   help="most tokens to generate (default: %(default)s)")
    g.add_argument("--temperature", "--temp", type=float, metavar="T",
                   help=f"sampling temperature (default: {_DEFAULTS['temperature']:g} = greedy, "
                        "always the most likely token)")
    g.add_argument("--top-p", type=float, metavar="P",
                   help=f"nucleus sampling mass (default: {_DEFAULTS['top_p']:g} = off)")
    g.add_argument("--top-k", type=int, metavar="K",
                   help=f"keep the K most likely tokens (default: {_DEFAULTS['top_k']} = off)")
    g.add_argument("--min-p", type=float, metavar="P",
                   help="drop tokens less likely than P x the most likely one "
                        f"(default: {_DEFAULTS['min_p']:g} = off)")
    g.add_argument("--repeat-penalty", dest="repetition_penalty", type=float, metavar="X",
                   help="penalty on tokens already in the prompt or output "
                        f"(default: {_DEFAULTS['repetition_penalty']:g} = off)")
    g.add_argument("--frequency-penalty", type=float, metavar="X",
                   help="OpenAI frequency penalty, -2..2 "
                        f"(default: {_DEFAULTS['frequency_penalty']:g})")
    g.add_argument("--presence-penalty", type=float, metavar="X",
                   help="OpenAI presence penalty, -2..2 "
                        f"(default: {_DEFAULTS['presence_penalty']:g})")
    g.add_argument("--seed", type=int,
                   help="random seed, for reproducible sampling (default: random)")
    g.add_argument("--stop", action="append", metavar="TEXT",
                   help="stop when the output contains TEXT (repeatable; TEXT is not printed)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="keep generating after the end-of-sequence token")
    g.add_argument("-c", "--ctx", type=int, metavar="N",
                   help="context size in tokens, prompt + output (default: the model's)")


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling keyword arguments the flags ask for, checked; the model is not needed."""
    kwargs: dict[str, Any] = {}
    for name in SAMPLING_FLAGS:
        value = getattr(args, name, None)
        if value is not None and value is not False:
            kwargs[name] = value
    try:
        SamplingParams(**kwargs)
    except InputError as exc:
        raise InputError(_flag_message(str(exc))) from None
    if args.ctx is not None and args.ctx < 2:
        raise InputError(f"-c/--ctx must be >= 2 tokens, got {args.ctx}")
    return kwargs


def _flag_message(message: str) -> str:
    for name, flag in SAMPLING_FLAGS.items():
        if message.startswith((f"{name} ", f"each {name} ")):
            return message.replace(name, flag.split("/")[-1], 1)
    return message


def load_model(args: argparse.Namespace, *, quiet: bool = False,
               bars: bool | None = None) -> LLM:
    """Load the model the flags name; say what is loading on stderr unless quiet. Progress
    bars (a large checkpoint, on a terminal) unless quiet, or as `bars` says."""
    import mistral7b

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"-t/--threads must be >= 1, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    from mistral7b.distributed.runtime import is_worker_rank

    if not quiet and not is_worker_rank():
        log(f"loading {args.model} ...")
    lora = None
    if getattr(args, "lora_specs", None):
        from mistral7b.lora.multi import parse_lora_spec

        lora = [parse_lora_spec(text) for text in args.lora_specs]
    llm = mistral7b.load(args.model, device=args.device, dtype=args.dtype,
                         quant=_quant(args.quant),
                         speculate=getattr(args, "speculate", 0),
                         draft_model=args.draft_model, draft_quant=_quant(args.draft_quant),
                         kv_cache_memory=args.kv_cache_memory, lora=lora,
                         progress=not quiet if bars is None else bars,
                         **({"tp": tp} if (tp := tensor_parallel(args)) else {}))
    llm.require_tokenizer()
    if args.threads is not None:
        llm.engine.adaptive_threads = False    # the user's count, every step
    return llm


def _quant(flag: str) -> str | None:
    return None if flag == "none" else flag


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def peak_memory() -> dict[str, float]:
    """Peak resident memory of this process (and of CUDA allocations), in MiB."""
    import torch

    # ru_maxrss is in KiB on Linux.
    out = {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def timings(llm: LLM, total_s: float | None = None) -> dict[str, Any]:
    """Figures of the last generation, for `--json` and the summary line; `total_s`: the
    wall time of the generation call, when the caller measured it."""
    s = llm.stats
    total = {} if total_s is None else {"total_s": round(total_s, 3)}
    return {
        **total,
        "load_s": round(llm.load_seconds, 3),
        "prompt_tokens": s.prompt_tokens,
        "cached_tokens": s.cached_tokens,
        "prompt_s": round(s.prefill_seconds, 3),
        "first_token_s": round(s.first_token_seconds or 0.0, 3),
        "prompt_tps": round(s.prompt_tps, 1),
        "generated_tokens": s.generated_tokens,
        "generation_s": round(s.decode_seconds, 3),
        "generation_tps": round(s.decode_tps, 1),
        "draft_tokens": s.draft_tokens,
        "accepted_tokens": s.accepted_tokens,
        **({"draft_model": llm.draft.name} if llm.draft is not None else {}),
        **{k: round(v, 1) for k, v in peak_memory().items()},
    }


def summary_line(t: dict[str, Any], *, load: bool = True) -> str:
    """'load 1.23 s | prompt 41 tok, 278.1 tok/s | generated 64 tok, 52.3 tok/s | peak RSS 512 MiB'

    `t`: `timings` here, or a server's answer (cli/remote.py `figures`): it starts with
    `served_by` and has no load or memory, and rates only where the server sent them."""
    parts = [f"served by {t['served_by']}"] if "served_by" in t else []
    if load and "load_s" in t:
        parts.append(f"load {t['load_s']:.2f} s")
    cached = f" ({t['cached_tokens']} cached)" if t.get("cached_tokens") else ""
    parts.append(f"prompt {t['prompt_tokens']} tok{cached}{_rate(t, 'prompt_tps')}")
    parts.append(f"first token {t['first_token_s']:.2f} s")
    parts.append(f"generated {t['generated_tokens']} tok{_rate(t, 'generation_tps')}")
    if t.get("draft_tokens"):
        by = f", draft model {t['draft_model']}" if t.get("draft_model") else ""
        parts.append(f"speculative {t['accepted_tokens']}/{t['draft_tokens']} drafts accepted "
                     f"({100 * t['accepted_tokens'] / t['draft_tokens']:.0f}%{by})")
    if "peak_rss_mib" in t:
        parts.append(f"peak RSS {t['peak_rss_mib']:.0f} MiB")
    if "peak_cuda_mib" in t:
        parts.append(f"peak CUDA {t['peak_cuda_mib']:.0f} MiB")
    return " | ".join(parts)


def _rate(t: dict[str, Any], key: str) -> str:
    return f", {t[key]:.1f} tok/s" if key in t else ""


def verbose_stats(t: dict[str, Any]) -> str:
    """The figures of `timings` (or of a server's answer, as for `summary_line`) one per
    line, as `ollama run --verbose` prints them."""
    def rate(tokens: float, tps: float) -> str:
        return f"{tps:.2f} tokens/s" if tokens else "n/a"

    rows = [("served by", t["served_by"])] if "served_by" in t else []
    if "total_s" in t:      # ollama's total: loading plus the generation call
        rows.append(("total duration", f"{t.get('load_s', 0.0) + t['total_s']:.3f} s"))
    if "load_s" in t:
        rows.append(("load duration", f"{t['load_s']:.3f} s"))
    rows.append(("prompt eval count", f"{t['prompt_tokens']} token(s)"
                                      + (f", {t['cached_tokens']} from the cache"
                                         if t.get("cached_tokens") else "")))
    if "prompt_tps" in t:
        rows += [("prompt eval duration", f"{t['prompt_s']:.3f} s"),
                 ("prompt eval rate", rate(t["prompt_tokens"], t["prompt_tps"]))]
    rows += [("time to first token", f"{t['first_token_s']:.3f} s"),
             ("eval count", f"{t['generated_tokens']} token(s)")]
    if "generation_tps" in t:
        rows += [("eval duration", f"{t['generation_s']:.3f} s"),
                 ("eval rate", rate(t["generated_tokens"] > 1, t["generation_tps"]))]
    if t.get("draft_tokens"):
        drafts = f"{t['accepted_tokens']}/{t['draft_tokens']} accepted" + (
            f" (draft model {t['draft_model']})" if t.get("draft_model") else "")
        rows.append(("speculative drafts", drafts))
    if "peak_rss_mib" in t:
        rows.append(("peak memory", f"{t['peak_rss_mib']:.0f} MiB RSS"
                                    + (f", {t['peak_cuda_mib']:.0f} MiB CUDA"
                                       if "peak_cuda_mib" in t else "")))
    width = max(len(label) for label, _ in rows) + 2
    return "\n".join(f"{label + ':':{width}}{value}" for label, value in rows)


def add_structured_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("structured output (each answer follows it, token by token)")
    g.add_argument("--json-schema", metavar="FILE",
                   help="a JSON schema file: the answer is JSON valid under it")
    g.add_argument("--grammar", metavar="FILE",
                   help="a grammar file: Lark (llguidance's dialect, `start:` rule), or "
                        "llama.cpp GBNF when FILE ends in .gbnf")


def read_response_format(args: argparse.Namespace) -> dict[str, Any] | None:
    """The response_format that --json-schema / --grammar ask for (read before loading)."""
    schema_file, grammar_file = args.json_schema, args.grammar
    if schema_file and grammar_file:
        raise InputError("give --json-schema or --grammar, not both")
    path = schema_file or grammar_file
    if path is None:
        return None
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None
    if schema_file:
        try:
            schema = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InputError(f"{path}: not valid JSON ({exc})") from None
        return {"type": "json_schema", "json_schema": {"name": Path(path).stem, "schema": schema}}
    if path.endswith(".gbnf"):
        from llguidance.gbnf_to_lark import GbnfToLarkError, gbnf_to_lark

        try:
            text = gbnf_to_lark(text)
        except GbnfToLarkError as exc:
            raise InputError(f"{path}: not valid GBNF ({str(exc).splitlines()[0]})") from None
    return {"type": "grammar", "grammar": text}


def use_response_format(llm: LLM, args: argparse.Namespace,
                        response_format: dict[str, Any] | None, sampling: dict[str, Any]) -> None:
    """Compile it now, so a bad file is one error line naming it; then add it to sampling."""
    if response_format is None:
        return
    try:
        llm.grammar_compiler.response_format(response_format)
    except InputError as exc:
        raise InputError(f"{args.json_schema or args.grammar}: {exc}") from None
    sampling["response_format"] = response_format
