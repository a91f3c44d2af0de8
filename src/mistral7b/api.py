"""The public Python API (DESIGN §3): `load()` and the LLM object."""

from __future__ import annotations

import time
from collections.abc import Generator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, overload

import torch

from mistral7b.batch import run_batch
from mistral7b.chat_history import TurnMemory
from mistral7b.chat_request import ChatPlan, plan_chat, with_tool_calls
from mistral7b.config import ModelConfig
from mistral7b.draft import DraftModel, attach_draft
from mistral7b.engine import Engine
from mistral7b.errors import InputError, Mistral7BError
from mistral7b.grammar import Grammar, GrammarCompiler
from mistral7b.request import Output
from mistral7b.sampling import SamplingParams
from mistral7b.sequence import Completion, GenerationStats
from mistral7b.text_stream import CompletionBuilder, TextStream

if TYPE_CHECKING:
    from mistral7b.model import Transformer
    from mistral7b.tokenizer.base import Tokenizer
    from mistral7b.weights.base import CheckpointReader

# On CPU, models up to this many parameters run in float32 by default (exact, and fast
# enough); bigger ones in bfloat16 (a 7B model in float32 would need 29 GB).
CPU_FLOAT32_MAX_PARAMS = 2_000_000_000

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "f32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "f16": torch.float16,
}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise InputError(f"unknown device {device!r}: use 'cpu' or 'cuda'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was asked for but PyTorch sees no CUDA GPU; "
                         "use device='cpu'")
    if dev.type not in ("cpu", "cuda"):
        raise InputError(f"device {device!r} is not supported: use 'cpu' or 'cuda'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device,
                  config: ModelConfig) -> torch.dtype:
    if dtype is None:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32 if config.n_params <= CPU_FLOAT32_MAX_PARAMS else torch.bfloat16
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise InputError(f"unknown dtype {dtype!r}: use float32, bfloat16 or float16")


def load(model: str | Path = "default", *, device: str | torch.device | None = None,
         dtype: str | torch.dtype | None = None, quant: str | None = None,
         lora: str | Path | Sequence[str | Path | tuple[str | Path, float]] | None = None,
         lora_merge: bool = True,
         kv_cache_memory: int | None = None, speculate: int = 0,
         progress: bool = False, tp: int | None = None, draft_model: str | Path | None = None,
         draft_quant: str | None = "auto") -> LLM:
    """Load a model: a checkpoint folder (consolidated or HF), a .gguf file, "default", or a
    name in the local store: an alias (pinned revision), a pulled Hub repository id, a name
    given with `mistral7b create` (store.py; nothing is downloaded here).

    quant: None keeps float weights (a quantized GGUF is dequantized); "int8" / "int4"
    quantize on load; "auto" runs a quantized GGUF on its own blocks (Q4_0/Q4_1 as int4,
    Q8_0 as int8, Q4_K/Q5_K/Q6_K on their own bits with the embedding table kept in its
    blocks, where our CPU kernel runs), as the CLI and server do by default, and anything
    else in float.
    lora: a PEFT adapter folder or a Mistral lora.safetensors, or a list of them and
    (path, scale) pairs applied together; merged into the weights (lora_merge=True) or kept
    as separate low-rank modules (always beside quantized weights). Adapters chosen per call
    instead: `llm.add_adapter(name, path)`, then `generate(..., adapter=name)`.
    speculate: draft tokens per decode step by prompt lookup (speculate.py; 0 = off), the
    `speculate` attribute of the returned LLM: same output, fewer steps where the answer
    repeats its context.
    draft_model: a model with the same tokenizer that drafts instead (draft.py; speculate=0
    means 4), loaded with draft_quant ("auto": a GGUF's own blocks, the fast draft): llm.draft.
    kv_cache_memory: the KV cache's budget in bytes (default: half the memory available when
    it is first needed, or 80% of free GPU memory); memory is taken as sequences advance.
    progress: tqdm bars on stderr (a terminal only) while a large checkpoint loads.
    tp: tensor parallel over the ranks torchrun started (tp = their number; README "Tensor
    parallel"): every rank calls load(); rank 0 gets the LLM, and on the other ranks load()
    serves rank 0's model calls on their shard and then exits the process (status 0).
    """
    from mistral7b import progress as bars
    from mistral7b.quant import AUTO, QUANT_MODES, file_mode, load_quantized, stored_quant
    from mistral7b.speculate import check_speculate
    from mistral7b.store import resolve
    from mistral7b.weights import open_checkpoint
    from mistral7b.weights.loader import build_model

    if quant is not None and quant != AUTO and quant not in QUANT_MODES:
        raise InputError(f"unknown quant {quant!r}: use 'int8', 'int4', 'auto' (a quantized "
                         "GGUF on its own blocks) or None (float weights)")
    t0 = time.perf_counter()
    path = resolve(model).path
    reader = open_checkpoint(path)
    if quant == AUTO:
        quant = file_mode(reader)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev, reader.config)
    stored = stored_quant(reader)
    group = None
    with bars.enabled(progress):
        if tp is not None and tp != 1:
            from mistral7b.distributed.tp_model import TensorParallel

            if lora is not None or speculate or draft_model is not None:
                raise InputError("tp > 1 runs without lora=, speculate= and draft_model=")
            group = TensorParallel(tp, dev)
            net = group.load(reader, quant, dtype=dt)
            if dev.type == "cpu" and dt == torch.bfloat16:
                from mistral7b.quant.layers import swap_bf16_linears

                swap_bf16_linears(net)
            group.start(net)        # on ranks other than 0: serves, then exits
        elif quant is None and stored is None:
            net = build_model(reader, dtype=dt, device=dev)
        else:  # asked for, or a folder written by `mistral7b quantize`
            net = load_quantized(reader, quant, dtype=dt, device=dev)
            if dev.type == "cpu" and dt != torch.float32:
                net.compute_in_float32()   # the table and KV cache stay in `dt`
    tokenizer = checkpoint_tokenizer(reader)
    llm = LLM(net, reader.config, tokenizer, path, kv_cache_memory)
    llm.speculate = check_speculate(speculate)
    if draft_model is not None:
        attach_draft(llm, load(draft_model, device=dev, quant=draft_quant, progress=progress),
                     str(draft_model))
    llm.quant = quant or stored
    if group is not None:
        llm.engine.pool_type = group.pool_type
    if lora is not None:
        from mistral7b.lora.multi import apply_lora_files, lora_specs

        apply_lora_files(llm.model, lora_specs(lora), merge=lora_merge)
    if dev.type == "cpu" and dt == torch.bfloat16:
        from mistral7b.quant.layers import swap_bf16_linears

        swap_bf16_linears(llm.model)  # decode on our bf16 kernel where the CPU has one
    llm.load_seconds = time.perf_counter() - t0
    return llm


def checkpoint_tokenizer(reader: CheckpointReader) -> Tokenizer | None:
    """The checkpoint's own tokenizer; for a Mistral folder without one, the mistral-common
    file of its vocabulary size; None when there is none (the model still takes token ids)."""
    from mistral7b.errors import TokenizerError
    from mistral7b.tokenizer import load_tokenizer
    from mistral7b.weights.gguf_file import GGUFReader

    try:
        if isinstance(reader, GGUFReader):  # reuse the open file: parsing GGUF metadata is not free
            from mistral7b.tokenizer.gguf import GGUFTokenizer

            return GGUFTokenizer.from_metadata(reader.header.metadata, reader.path)
        saved_gguf = Path(reader.path) / "tokenizer.gguf"  # `mistral7b quantize` of a GGUF
        if saved_gguf.is_file():
            from mistral7b.tokenizer.gguf import GGUFTokenizer

            return GGUFTokenizer.from_file(saved_gguf)
        return load_tokenizer(reader.path)
    except TokenizerError:
        if reader.format == "consolidated" and reader.config.vocab_size in (32000, 32768):
            from mistral7b.tokenizer.mistral import MistralTokenizer

            return MistralTokenizer.for_vocab(reader.config.vocab_size)
        return None


class LLM:
    """A loaded model with its tokenizer. Thread-compatible, not thread-safe."""

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer: Tokenizer | None,
                 path: Path, kv_cache_memory: int | None = None) -> None:
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.path = path
        self.engine = Engine(model, config, kv_cache_memory)
        self.load_seconds = 0.0
        self.speculate = 0          # draft tokens per decode step (0 = off)
        self.draft: DraftModel | None = None    # drafts instead of prompt lookup (draft.py)
        self.quant: str | None = None   # "int8" / "int4" weights, None for float
        self._stats = GenerationStats()
        self._grammar_compiler: GrammarCompiler | None = None
        self.adapters: dict[str, int] = {}      # served LoRA adapters: name -> slot
        self._turns = TurnMemory()      # the last chat answer's own ids (chat_history.py)

    def __repr__(self) -> str:
        return (f"LLM({str(self.path)!r}, {self.config.n_params / 1e9:.2f}B params, "
                f"{self.engine.dtype}, {self.engine.device})")

    @property
    def device(self) -> torch.device:
        """Where the weights are (and where inputs to `model` go)."""
        return self.engine.device

    def check_ids(self, ids: Sequence[int]) -> None:
        """InputError unless every id is in the vocabulary (the rule generate() applies)."""
        self.engine.check_ids(ids)

    def logits(self, ids: Sequence[int], chunk_size: int | None = None) -> torch.Tensor:
        """Float32 logits [len(ids), vocab] computed through the cache in chunks of chunk_size
        tokens (None = the window W); 1 = token by token, the decode path."""
        return self.engine.logits(_as_ids(ids), chunk_size)

    @overload
    def generate(self, prompt_or_prompts: str | Sequence[int], *,
                 max_context: int | None = None, **sampling: Any) -> Completion: ...

    @overload
    def generate(self, prompt_or_prompts: list[str] | list[list[int]], *,
                 max_context: int | None = None, **sampling: Any) -> list[Completion]: ...

    @overload
    def generate(self, prompt_or_prompts: torch.Tensor, *, max_context: int | None = None,
                 **sampling: Any) -> Completion | list[Completion]: ...

    def generate(self, prompt_or_prompts: Any, *, max_context: int | None = None,
                 response_format: dict[str, Any] | None = None,
                 **sampling: Any) -> Completion | list[Completion]:
        """Complete one prompt (str or token ids) or a list of them (a ragged batch).

        response_format: structured output, OpenAI's shape ({"type": "json_object"},
        {"type": "json_schema", "json_schema": {"schema": {...}}}) or our extensions
        {"type": "regex", "regex": ...} / {"type": "grammar", "grammar": <Lark>}; every
        completion then follows it (see mistral7b.grammar).
        """
        single, prompts = self._prompts(prompt_or_prompts)
        adapter = self._adapter_slot(sampling.pop("adapter", None))
        params = _params(sampling)
        grammar = self.grammar_compiler.response_format(response_format) \
            if response_format is not None else None
        return self._complete(single, prompts, params, max_context, grammar, adapter)

    def _complete(self, single: bool, prompts: list[list[int]], params: SamplingParams,
                  max_context: int | None, grammar: Grammar | None, adapter: int = 0
                  ) -> Completion | list[Completion]:
        builders = [CompletionBuilder(len(p), params.logprobs) for p in prompts]
        for i, out in self._events(prompts, params, max_context, grammar, adapter):
            builders[i].add(out)
        completions = [b.completion for b in builders]
        return completions[0] if single else completions

    def stream(self, prompt: Any, *, max_context: int | None = None,
               **sampling: Any) -> TextStream:
        """Text deltas of one completion as they are generated (valid UTF-8 at every step).

        The returned iterator's `.completion` holds the finished Completion (finish reason,
        token ids) once it is exhausted.
        """
        single, prompts = self._prompts(prompt)
        if not single:
            raise InputError("stream() takes one prompt; use generate() for a batch")
        response_format = sampling.pop("response_format", None)
        adapter = self._adapter_slot(sampling.pop("adapter", None))
        params = _params(sampling)
        grammar = self.grammar_compiler.response_format(response_format) \
            if response_format is not None else None
        return TextStream(self._events(prompts, params, max_context, grammar, adapter),
                          len(prompts[0]), params)

    def chat(self, messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
             tool_choice: Any = None, response_format: dict[str, Any] | None = None,
             safe_prompt: bool = False, parallel_tool_calls: bool = True,
             max_context: int | None = None, **sampling: Any) -> Completion:
        """Answer a conversation [{"role": ..., "content": ...}] with the model's chat format.

        tools / tool_choice: OpenAI's function calling (see mistral7b.chat_request); calls the
        model makes come back in `Completion.tool_calls` with finish reason "tool_calls".
        response_format: structured output, as in generate(). safe_prompt: the paper's
        guardrail system prompt.
        """
        adapter = self._adapter_slot(sampling.pop("adapter", None))
        plan = self._plan_chat(messages, tools, tool_choice, response_format, safe_prompt,
                               parallel_tool_calls)
        params = _params(plan.sampling(sampling))
        ids = self._continue_turn(messages, plan, safe_prompt, tools)
        completion = self._complete(True, [ids], params, max_context, plan.grammar, adapter)
        assert isinstance(completion, Completion)
        self._turns.remember(self.require_tokenizer(), messages, plan.ids, ids,
                             None if tools else completion)
        if plan.tool_format is not None:
            completion = with_tool_calls(self.require_tokenizer(), completion, plan.tool_format)
        return completion

    def stream_chat(self, messages: list[dict[str, Any]], *, safe_prompt: bool = False,
                    response_format: dict[str, Any] | None = None,
                    max_context: int | None = None, **sampling: Any) -> TextStream:
        adapter = self._adapter_slot(sampling.pop("adapter", None))
        plan = self._plan_chat(messages, None, None, response_format, safe_prompt)
        params = _params(sampling)
        ids = self._continue_turn(messages, plan, safe_prompt, None)
        self._turns.forget()            # until this answer is complete

        def done(completion: Completion) -> None:
            self._turns.remember(self.require_tokenizer(), messages, plan.ids, ids, completion)

        return TextStream(self._events([ids], params, max_context, plan.grammar, adapter),
                          len(ids), params, on_done=done)

    def _continue_turn(self, messages: list[dict[str, Any]], plan: ChatPlan, safe_prompt: bool,
                       tools: Any) -> list[int]:
        """The plan's prompt ids, on the previous answer's own ids when `messages` continue
        the last chat turn, so its cached KV is reused to the end (chat_history.py)."""
        if tools:
            return plan.ids
        tok = self.require_tokenizer()
        return self._turns.continue_ids(
            messages, plan.ids,
            lambda m: tok.encode_chat(m, add_generation_prompt=True, safe_prompt=safe_prompt))

    def _plan_chat(self, messages: list[dict[str, Any]], tools: Any, tool_choice: Any,
                   response_format: Any, safe_prompt: bool,
                   parallel_tool_calls: bool = True) -> ChatPlan:
        return plan_chat(self.require_tokenizer(), lambda: self.grammar_compiler, messages,
                         tools=tools, tool_choice=tool_choice, response_format=response_format,
                         safe_prompt=safe_prompt, parallel_tool_calls=parallel_tool_calls)

    @property
    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles response formats for this model's tokenizer (built on first use: it
        adapts the whole vocabulary, ~0.5 s)."""
        if self._grammar_compiler is None:
            self._grammar_compiler = GrammarCompiler(self.require_tokenizer(),
                                                     self.config.vocab_size)
        return self._grammar_compiler

    def moderate(self, text_or_messages: str | list[dict[str, Any]]) -> tuple[str, float]:
        """Self-reflection moderation (paper §5.2): (category, probability), the category one
        of Mistral's 13 (`mistral7b.moderation.CATEGORIES`) or "not moderated". Every label's
        probability: `mistral7b.moderation.moderate(llm.engine, llm.tokenizer, ...)`."""
        from mistral7b.moderation import moderate

        self.engine.forget_stale_prefixes()
        result = moderate(self.engine, self.require_tokenizer(), text_or_messages)
        return result.category, result.probability

    def add_adapter(self, name: str, path: str | Path, scale: float = 1.0) -> None:
        """Load a LoRA adapter (PEFT or Mistral file) to be chosen per call with
        `generate(..., adapter=name)`: the base weights stay as they are, and calls (or server
        requests) with different adapters, or none, share one batch."""
        from mistral7b.lora.files import read_adapter
        from mistral7b.lora.multi import add_served_adapter, scaled

        if not name or name in self.adapters:
            raise InputError(f"adapter name {name!r} is empty or already taken")
        adapter = scaled(read_adapter(path, self.config), scale)
        self.adapters[name] = add_served_adapter(self.model, self.engine.adapter_rows, adapter)

    def clear_cache(self) -> None:
        """Forget the KV of earlier calls (kept to be reused by prompts that extend them)."""
        self.engine.pool.clear_prefixes()
        if self.draft is not None:
            self.draft.clear_prefixes()
        self._turns.forget()

    @property
    def stats(self) -> GenerationStats:
        """What the last generation did: tokens computed and reused, timings."""
        return self._stats

    # ---------------------------------------------------------------- helpers

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise Mistral7BError(f"{self.path}: this checkpoint has no tokenizer; pass token "
                                 "ids instead of text, or add tokenizer files to the folder")
        return self.tokenizer

    def _prompts(self, value: Any) -> tuple[bool, list[list[int]]]:
        if isinstance(value, str):
            return True, [self.require_tokenizer().encode(value, bos=True)]
        if isinstance(value, torch.Tensor):
            value = value.tolist()
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, int) for v in value):
            return True, [list(value)]
        if isinstance(value, (list, tuple)) and value:
            prompts = []
            for v in value:
                single, ids = self._prompts(v)
                if not single:
                    raise InputError("a batch of prompts cannot be nested")
                prompts.extend(ids)
            return False, prompts
        raise InputError("a prompt must be a string, a list of token ids, or a non-empty list "
                         "of those")

    def _adapter_slot(self, name: str | None) -> int:
        if name is None:
            return 0
        if name not in self.adapters:
            known = ", ".join(self.adapters) or "none; add one with add_adapter()"
            raise InputError(f"no adapter named {name!r} (loaded: {known})")
        return self.adapters[name]

    def _events(self, prompts: list[list[int]], params: SamplingParams,
                max_context: int | None, grammar: Grammar | None = None, adapter: int = 0
                ) -> Generator[tuple[int, Output], None, None]:
        """The one step loop (batch.run_batch) over these prompts. The KV of earlier
        calls stays cached, so a prompt that extends an earlier one (the next chat turn)
        computes only its new tokens."""
        tok = self.require_tokenizer()  # generated text is decoded with it
        self._stats = GenerationStats()
        bias_ids = [i for i, _ in params.logit_bias]
        if bias_ids:
            try:
                self.check_ids(bias_ids)
            except InputError as exc:
                raise InputError(f"logit_bias: {exc}", param="logit_bias") from None
        return run_batch(self.engine, prompts, [params] * len(prompts), stop_ids=tok.stop_ids,
                         new_decoder=tok.decoder, max_context=max_context, stats=self._stats,
                         speculate=self.speculate, grammar=grammar, adapter=adapter,
                         draft=self.draft)


def _as_ids(ids: Any) -> list[int]:
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    return [int(i) for i in ids]


def _params(sampling: dict[str, Any]) -> SamplingParams:
    try:
        return SamplingParams(**sampling)
    except TypeError as exc:
        raise InputError(f"unknown sampling option: {exc}") from None
