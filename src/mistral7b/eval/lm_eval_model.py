"""mistral7b as an lm-evaluation-harness model: `--model mistral7b --model_args model=PATH`.

lm-eval 0.4 finds models only in its own registry (it reads no entry points), so the model is
registered when this module is imported, and the harness is run through it:

    python -m mistral7b.eval.lm_eval_model --model mistral7b \\
        --model_args model=PATH,dtype=bfloat16,batch_size=8 --tasks hellaswag
    mistral7b eval harness --model_args model=PATH --tasks hellaswag     (the same)

Every argument after the module name is lm-eval's own (`lm-eval run --help`); local tasks
come in with `--include_path DIR`. From Python, `lm_eval.simple_evaluate(model=
Mistral7BLM(llm=llm), tasks=[...])` evaluates an already loaded model.

model_args: model (folder / .gguf / "default"), dtype, max_length (default: the model's
max_seq_len, capped at 4096), lora (an adapter to apply), lora_merge; the device and batch
size come from lm-eval's own --device and --batch_size.

- loglikelihood: (context, continuation) pairs scored in padded batches (eval/scoring.py).
- loglikelihood_rolling: lm-eval's disjoint windows of max_length predictions, the first
  predicted from the BOS (or EOS) token, each window with as much context as fits.
- generate_until: greedy (or sampled, with do_sample) through the engine's ragged batches,
  stopping at `until` strings or EOS, at most max_gen_toks tokens.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import model_registry
except ImportError as exc:  # only this module needs the harness
    raise ImportError("mistral7b.eval.lm_eval_model needs lm-evaluation-harness: "
                      "pip install lm-eval") from exc

from mistral7b.eval.scoring import Score, encode_pair, prefix_token, score_continuations

if TYPE_CHECKING:
    import torch

    from mistral7b.api import LLM

NAME = "mistral7b"
DEFAULT_MAX_GEN_TOKS = 256
DEFAULT_BATCH_SIZE = 8
MAX_LENGTH_CAP = 4096


def _register_once(cls: type) -> type:
    # Running this file with `python -m` imports it twice (__main__ and its real name): the
    # harness refuses a second, different class under one name, and both are the same code.
    if NAME not in model_registry:
        model_registry.register(NAME)(cls)
    return cls


@_register_once
class Mistral7BLM(LM):
    def __init__(self, model: str = "default", device: str | None = None,
                 dtype: str | None = None, batch_size: int | str = DEFAULT_BATCH_SIZE,
                 max_length: int | str | None = None, lora: str | None = None,
                 lora_merge: bool | str = True, llm: LLM | None = None,
                 **_ignored: Any) -> None:
        super().__init__()
        if llm is None:
            import mistral7b

            llm = mistral7b.load(model, device=device, dtype=dtype)
            if lora:
                from mistral7b.lora import apply_lora_file

                apply_lora_file(llm, lora, merge=_as_bool(lora_merge))
        self.llm = llm
        self.tokenizer = llm.require_tokenizer()
        self.batch_size = (DEFAULT_BATCH_SIZE if str(batch_size).startswith("auto")
                           else int(batch_size))
        self.max_length = int(max_length) if max_length else min(llm.config.max_seq_len,
                                                                  MAX_LENGTH_CAP)

    @property
    def device(self) -> torch.device:
        return self.llm.device

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[Score]:
        return score_continuations(self.llm.model, pairs, max_len=self.max_length,
                                   batch_size=self.batch_size,
                                   window=self.llm.config.sliding_window)

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        pairs = [encode_pair(self.tokenizer, *req.args) for req in requests]
        out = []
        for req, s in zip(requests, self._score(pairs)):
            result = (s.logprob, s.is_greedy)
            self.cache_hook.add_partial("loglikelihood", req.args, result)
            out.append(result)
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        pairs, owner = [], []
        for r, req in enumerate(requests):
            ids = self.tokenizer.encode(req.args[0], bos=False)
            for pair in rolling_windows(ids, prefix_token(self.tokenizer), self.max_length):
                pairs.append(pair)
                owner.append(r)
        totals = [0.0] * len(requests)
        for r, s in zip(owner, self._score(pairs)):
            totals[r] += s.logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        out = [""] * len(requests)
        for key, members in groups.items():
            sampling = self._sampling(json.loads(key))
            budget = self.max_length - sampling["max_tokens"]
            for s in range(0, len(members), self.batch_size):
                chunk = members[s: s + self.batch_size]
                prompts = []
                for i in chunk:
                    ids = self.tokenizer.encode(requests[i].args[0], bos=True)
                    prompts.append(ids[-budget:] if budget > 0 else ids[-1:])
                completions = self.llm.generate(prompts, **sampling)
                for i, c in zip(chunk, completions):
                    out[i] = c.text
                    self.cache_hook.add_partial("generate_until", requests[i].args, c.text)
        return out

    def _sampling(self, gen_kwargs: dict[str, Any]) -> dict[str, Any]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sampling: dict[str, Any] = {
            "max_tokens": int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)),
            "stop": [u for u in until if u],
            "temperature": 0.0,
        }
        if _as_bool(gen_kwargs.get("do_sample", False)):
            sampling["temperature"] = float(gen_kwargs.get("temperature", 1.0))
            if "top_p" in gen_kwargs:
                sampling["top_p"] = float(gen_kwargs["top_p"])
            if "top_k" in gen_kwargs:
                sampling["top_k"] = int(gen_kwargs["top_k"])
        return sampling


def rolling_windows(ids: list[int], prefix: int,
                    max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's rolling windows as (context, continuation) pairs: every token of `ids` is
    predicted once; windows of max_length predictions, each read with as much context as
    fits in max_length tokens (the first token is predicted from `prefix`).

    E.g. ids = t0..t9, max_length 4: ([P], t0..t3), ([t3], t4..t7), ([t5 t6 t7], t8 t9):
    the model reads P t0 t1 t2 / t3 t4 t5 t6 / t5 t6 t7 t8, as in lm-eval's own example.
    """
    full = [prefix] + list(ids)               # full[j + 1] == ids[j]
    out = []
    for a in range(0, len(ids), max_length):
        b = min(a + max_length, len(ids))
        c = max(0, b - max_length)            # the model reads full[c:b]
        out.append((full[c: a + 1], ids[a:b]))
    return out


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


def main(argv: Sequence[str] | None = None) -> int:
    """lm-eval's own command line with the mistral7b model registered; `--model mistral7b`,
    `--device` (cuda when available, else cpu) and `--batch_size 8` unless given."""
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if not (args and args[0] in ("ls", "validate")):
        # The harness passes its own --device (default cuda:0, even without a GPU) and
        # --batch_size (default 1) to the model: give it ours unless the user chose.
        import torch

        defaults = {"--model": NAME, "--device": "cuda" if torch.cuda.is_available() else "cpu",
                    "--batch_size": str(DEFAULT_BATCH_SIZE)}
        for flag, value in defaults.items():
            if not any(a == flag or a.startswith(flag + "=") for a in args):
                args = [flag, value, *args]
    saved = sys.argv
    sys.argv = ["lm-eval", *args]
    try:
        cli_evaluate()
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
