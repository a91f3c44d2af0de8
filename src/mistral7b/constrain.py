"""Constrained decoding: one sequence's grammar state, turned into a logits mask each step.

A `Constraint` wraps an llguidance `LLMatcher` (an Earley parser over the grammar plus a
token trie of the vocabulary). The scheduler asks it, before sampling a row, which token ids
may come next (`mask_`: the others get -inf), and tells it the token that was sampled
(`advance`). Every sampling setting then stays inside the grammar: greedy takes the argmax
of the masked row; top-k/top-p/min-p and the categorical draw see only allowed tokens.

The mask arrives as a bitmask of ceil(V / 32) int32 words, bit j of word w standing for
token 32 w + j; `mask_` expands it with one shift-and over a [V/32, 32] view. Once the
grammar is complete and nothing may follow (`stopped`), the sequence ends with "stop" at
once: the mask would allow only EOS.

Log-probabilities are still reported from the unmasked logits (what the model thinks), as
vLLM does.
"""

from __future__ import annotations

from typing import Any

import torch

from mistral7b.errors import InputError

_SHIFTS = torch.arange(32, dtype=torch.int32)


class ConstraintError(InputError):
    """The grammar engine refused a token or reached an error state."""


class Constraint:
    """The grammar state of one sequence (see the module docstring)."""

    def __init__(self, matcher: Any, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        self._words = torch.zeros((vocab_size + 31) // 32, dtype=torch.int32)
        self.tokens = 0

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens the grammar allows next."""
        words = self._words
        self._matcher.unsafe_compute_mask_ptr(words.data_ptr(), words.numel() * 4)
        self._check()
        bits = (words.unsqueeze(1) >> _SHIFTS) & 1           # (V/32, 32)
        return bits.view(-1)[: self.vocab_size].bool()

    def mask_(self, row: torch.Tensor) -> None:
        """Set the logits of disallowed tokens in `row` [V] to -inf, in place."""
        allowed = self.allowed().to(row.device)
        if allowed.shape[0] < row.shape[-1]:     # logits wider than the vocabulary
            row[allowed.shape[0]:] = float("-inf")
            row = row[: allowed.shape[0]]
        row.masked_fill_(~allowed, float("-inf"))

    def advance(self, token_id: int) -> None:
        """Take the sampled token; ConstraintError if the grammar did not allow it."""
        if not self._matcher.consume_token(int(token_id)):
            raise ConstraintError(f"the grammar refused token {token_id}: "
                                  f"{self._matcher.get_error() or 'not allowed here'}")
        self.tokens += 1

    def rollback(self, n: int) -> None:
        """Forget the last n accepted tokens (for a verifier that rejects draft tokens)."""
        if n:
            self._matcher.rollback(n)
            self.tokens -= n

    @property
    def stopped(self) -> bool:
        """The grammar is complete and allows nothing more (only EOS)."""
        return bool(self._matcher.is_stopped()) and not self._matcher.is_error()

    @property
    def accepting(self) -> bool:
        return bool(self._matcher.is_accepting())

    def _check(self) -> None:
        if self._matcher.is_error():
            raise ConstraintError(f"the grammar engine failed: {self._matcher.get_error()}")
