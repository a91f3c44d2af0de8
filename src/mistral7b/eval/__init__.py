"""Evaluation: sliding-window perplexity, multiple-choice log-likelihood, the
lm-evaluation-harness model (lm_eval_model.py, needs `pip install lm-eval`) and the paper's
table (paper.py). All of it scores through one routine, `scoring.score_continuations`.
"""

from __future__ import annotations

from mistral7b.eval.multiple_choice import MCItem, MCResult, read_items
from mistral7b.eval.multiple_choice import evaluate as evaluate_multiple_choice
from mistral7b.eval.perplexity import PerplexityResult, perplexity, sliding_windows
from mistral7b.eval.scoring import Score, encode_pair, score_continuations

__all__ = [
    "MCItem", "MCResult", "PerplexityResult", "Score", "encode_pair",
    "evaluate_multiple_choice", "perplexity", "read_items", "score_continuations",
    "sliding_windows",
]
