"""Speculative decoding with a draft model: a smaller model of the same vocabulary guesses.

Prompt lookup (speculate.py) drafts only where the answer repeats its context; a draft model
drafts everywhere, at the price of running it. Each decode step of the scheduler, for every
decoding row at once:

    1. catch up: feed the draft the row's tokens its cache lacks (the whole prompt the first
       time, in chunks, after taking what its prefix cache holds; then what the target
       emitted last step: the accepted drafts' last one and the correction or bonus token);
    2. draft: k greedy steps (argmax, no penalties), batched over the rows;
    3. the target verifies the k tokens in one step (speculate.py's rule, unchanged), then
       `accept(row, n)` truncates the draft's table to the n drafts that were kept.

Worked example, k = 3, a row of 10 tokens t0..t9 whose draft cache holds t0..t7:

    catch up   feed [t8 t9]        -> d1          draft table: t0..t9          (length 10)
    draft      feed [d1] -> d2, feed [d2] -> d3   draft table: t0..t9 d1 d2    (length 12)
    verify     target emits d1 + a correction c (d2 rejected): accept(row, 1) -> length 11
    next step  catch up feeds [c]

The draft is greedy, so it is a deterministic function of the context: speculate.py's
verification ("sample t_i from the target's p; accept while t_i == d_i") keeps every
emitted token distributed exactly as in plain decoding, whatever the draft model is (a
wrong draft costs speed, never correctness), and greedy output stays token for token.

The draft has its own `Engine` and KV pool (as many tokens as the target's pool holds,
unless its engine was given a budget) and one block table per decoding row, released when
the row ends, is cancelled or preempted. A full draft pool is no error: the rows of that
step get no draft (their tables go back) and decode plainly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from mistral7b.attention_plan import PAGED_MAX_T
from mistral7b.cache import BlockTable, KVCacheFull, KVPool, slot_bytes
from mistral7b.engine import Engine
from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.api import LLM
    from mistral7b.sequence import Sequence
    from mistral7b.tokenizer.base import Tokenizer

log = logging.getLogger("mistral7b.draft")

DEFAULT_DRAFT_TOKENS = 4    # k when a draft model is given without `speculate`
CATCH_UP_CHUNK = 256        # a new row's prompt is fed to the draft in chunks of this size
# Text whose encoding both tokenizers must agree on: words, digits, code, whitespace runs,
# accents, CJK, an emoji (byte fallback), and spelled-out control tokens.
PROBE_TEXT = ("The quick brown fox, 1234567890 times: def f(x):\n\treturn x ** 2  # note\n"
              "Élève naïve café — 東京 🦙 [INST] </s> <|im_end|> <s>\n\n   end.")
SAMPLED_PIECES = 4096       # vocabulary entries compared, spread over the whole vocabulary


@dataclass(eq=False)
class _Row:
    table: BlockTable = field(default_factory=BlockTable)
    real: int = 0           # leading positions of the table that hold the row's own tokens
    outside: bool = False   # the row holds an id the draft cannot embed: it gets no drafts


class DraftModel:
    """The draft model of a target: its engine, and one block table per decoding row.

    `vocab` bounds the ids it may propose and be fed: the smaller of the two models'
    embedding tables (either may be padded beyond the tokenizer's vocabulary).
    """

    def __init__(self, engine: Engine, *, vocab: int, name: str = "draft",
                 quant: str | None = None, target: Engine | None = None) -> None:
        self.engine = engine
        self.vocab = min(vocab, engine.config.vocab_size)
        self.name = name
        self.quant = quant
        self._target = target
        self._rows: dict[Sequence, _Row] = {}

    def __repr__(self) -> str:
        return f"DraftModel({self.name!r}, {self.engine.config.n_params / 1e6:.0f}M params)"

    @classmethod
    def of(cls, target: LLM, draft: LLM, name: str) -> DraftModel:
        """The loaded `draft` as the draft of `target`; InputError unless both tokenizers
        are the same."""
        if target.tokenizer is None or draft.tokenizer is None:
            which = target.path if target.tokenizer is None else draft.path
            raise InputError(f"{which} has no tokenizer: a draft model needs one to show that "
                             "its vocabulary is the target's")
        check_same_vocabulary(target.tokenizer, draft.tokenizer, str(target.path), name)
        return cls(draft.engine, vocab=target.config.vocab_size, name=name, quant=draft.quant,
                   target=target.engine)

    # ----------------------------------------------------------------- the cache

    @property
    def pool(self) -> KVPool:
        """The draft's KV pool; unless its engine has a budget, it holds as many tokens as
        the target's and a quarter more (every row's drafts), at the draft's bytes a token."""
        engine, target = self.engine, self._target
        if engine.kv_cache_memory is None and target is not None and not engine.pool_made:
            tokens = target.pool.capacity_blocks * target.pool.block_size
            engine.kv_cache_memory = int(tokens * 1.25 * slot_bytes(engine.config, engine.dtype)) + 1
        return engine.pool

    def clear_prefixes(self) -> None:
        """Forget the draft's cached prefixes (`LLM.clear_cache`)."""
        if self.engine.pool_made:
            self.engine.pool.clear_prefixes()

    @property
    def held_blocks(self) -> int:
        """Blocks the draft's rows hold now (cached prefixes not counted): 0 when idle."""
        if not self.engine.pool_made:
            return 0
        pool = self.engine.pool
        return pool.capacity_blocks - pool.available_blocks

    @property
    def rows(self) -> int:
        return len(self._rows)

    # ----------------------------------------------------------------- the steps

    @torch.inference_mode()
    def propose(self, rows: list[Sequence], k: list[int]) -> list[list[int]]:
        """Up to k[i] greedy draft tokens for each row (rows with k[i] = 0 get none)."""
        out: list[list[int]] = [[] for _ in rows]
        live = [i for i, n in enumerate(k) if n > 0 and self._prepare(rows[i])]
        if not live:
            return out
        states = [self._rows[rows[i]] for i in live]
        try:
            logits = self._catch_up([rows[i] for i in live], states)
            for j, i in enumerate(live):
                states[j].real = states[j].table.trim_pos = len(rows[i].tokens)
            going = list(range(len(live)))
            while True:
                best = logits[:, : self.vocab].argmax(dim=-1).tolist()
                for j, token in zip(going, best):
                    out[live[j]].append(int(token))
                going = [j for j in going if len(out[live[j]]) < k[live[j]]]
                if not going:
                    break
                logits = self.engine.step([states[j].table for j in going],
                                          [[out[live[j]][-1]] for j in going])
        except Exception as exc:    # a draft is only a guess: its rows decode without one
            if isinstance(exc, KVCacheFull):
                log.info("draft KV cache full: %d row(s) decode without a draft", len(live))
            else:
                log.exception("the draft model's step failed; decoding without a draft")
            for i in live:
                self.release(rows[i])
            return [[] for _ in rows]
        return out

    def accept(self, row: Sequence, n: int) -> None:
        """The target kept the row's first n drafts: forget the draft's KV past them."""
        state = self._rows.get(row)
        if state is None:
            return
        state.real = min(state.real + n, state.table.length)
        self.pool.truncate(state.table, state.real)

    def release(self, row: Sequence) -> None:
        """The row ended, was cancelled or preempted: its draft blocks go back (full blocks
        of its own tokens stay cached for later rows with the same prefix)."""
        state = self._rows.pop(row, None)
        if state is None:
            return
        self.pool.truncate(state.table, state.real)
        self.pool.release(state.table, row.tokens)

    def _prepare(self, row: Sequence) -> bool:
        """The row's table holding only its own tokens, the prefix cache's first; False
        when a token it would be fed is outside the draft's vocabulary (no draft then)."""
        state = self._rows.get(row)
        if state is None:
            state = self._rows[row] = _Row()
            self.pool.reuse(state.table, row.tokens)
            state.real = state.table.length
        self.pool.truncate(state.table, state.real)     # drafts never accepted
        if not state.outside and max(row.tokens[state.real:], default=0) >= self.vocab:
            self.pool.release(state.table)          # kept, empty, until the row ends
            state.outside = True
        return not state.outside

    def _catch_up(self, rows: list[Sequence], states: list[_Row]) -> torch.Tensor:
        """Feed each row what its draft table lacks; the logits after its last token (B, V).
        Long catch-ups (new prompts) go in chunks and in a step of their own, so that rows
        that need a token or two are not padded to a prompt's length."""
        pool = self.pool

        def step(idx: list[int], chunks: list[list[int]]) -> torch.Tensor:
            logits = self.engine.step([states[j].table for j in idx], chunks)
            for j in idx:
                pool.register(states[j].table, rows[j].tokens)
            return logits

        def pending(j: int) -> list[int]:
            return rows[j].tokens[states[j].table.length:]

        long = [j for j in range(len(rows)) if len(pending(j)) > PAGED_MAX_T]
        while long:
            over = [j for j in long if len(pending(j)) > CATCH_UP_CHUNK]
            if not over:
                break
            step(over, [pending(j)[:CATCH_UP_CHUNK] for j in over])
        out: list[torch.Tensor | None] = [None] * len(rows)
        for group in ([j for j in range(len(rows)) if j not in long], long):
            if group:
                logits = step(group, [pending(j) for j in group])
                for j, row in zip(group, logits):
                    out[j] = row
        return torch.stack([o for o in out if o is not None])


def attach_draft(target: LLM, draft: LLM, name: str) -> None:
    """Make the loaded `draft` the draft model of `target` (`target.draft`), drafting
    DEFAULT_DRAFT_TOKENS a step unless `target.speculate` says otherwise."""
    target.draft = DraftModel.of(target, draft, name)
    target.speculate = target.speculate or DEFAULT_DRAFT_TOKENS


def check_same_vocabulary(target: Tokenizer, draft: Tokenizer, target_name: str,
                          draft_name: str) -> None:
    """InputError unless the two tokenizers give the same ids: the same vocabulary size,
    BOS, EOS and stop ids, the same encoding of PROBE_TEXT, and the same pieces at
    SAMPLED_PIECES ids spread over the vocabulary (its last ones included)."""
    def differ(what: str, a: object, b: object) -> InputError:
        return InputError(
            f"the draft model {draft_name} does not share the vocabulary of {target_name}: "
            f"{what} differ ({_short(a)} vs {_short(b)}); speculative decoding needs a draft "
            "with the same tokenizer (e.g. a smaller or quantized model of the same family)")

    size = target.vocab_size
    checks: tuple[tuple[str, object, object], ...] = (
        ("vocabulary sizes", size, draft.vocab_size),
        ("BOS ids", target.bos_id, draft.bos_id),
        ("EOS ids", target.eos_id, draft.eos_id),
        ("stop ids", sorted(target.stop_ids), sorted(draft.stop_ids)),
        ("encodings of a probe text", target.encode(PROBE_TEXT, bos=True),
         draft.encode(PROBE_TEXT, bos=True)))
    for what, a, b in checks:
        if a != b:
            raise differ(what, a, b)
    ids = sorted({*range(0, size, max(1, size // SAMPLED_PIECES)), *range(max(size - 64, 0),
                                                                          size)})
    for i in ids:
        if (piece := target.id_to_piece(i)) != (other := draft.id_to_piece(i)):
            raise differ(f"the pieces of id {i}", repr(piece), repr(other))


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."
