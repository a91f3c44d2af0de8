"""The Mistral 7B paper's table (Jiang et al. 2023, Table 2), re-run with lm-evaluation-harness
and printed beside the paper's figures.

    mistral7b eval paper -m /models/Mistral-7B-v0.1 [--limit 200] [--batch-size 8]
    paper.evaluate(llm, limit=200)        # from Python: {row name: percent}

The datasets come from the HF hub through lm-eval's task definitions, or from the local HF
cache (set HF_DATASETS_OFFLINE=1 to forbid downloads). The harness's prompts are not the
authors' own evaluation pipeline, so a point or two of difference is expected; the paper
reports MMLU 5-shot and the commonsense tasks 0-shot. `--limit N` scores only the first N
questions of each task (a quick check, not a comparable figure).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mistral7b.errors import InputError

if TYPE_CHECKING:
    from mistral7b.api import LLM


@dataclass(frozen=True)
class PaperRow:
    name: str       # as the paper prints it
    task: str       # lm-eval task (or group) name
    shots: int
    metric: str     # lm-eval metric the figure corresponds to
    paper: float    # Mistral 7B, percent


PAPER_TABLE = (
    PaperRow("MMLU", "mmlu", 5, "acc", 60.1),
    PaperRow("HellaSwag", "hellaswag", 0, "acc_norm", 81.3),
    PaperRow("WinoGrande", "winogrande", 0, "acc", 75.3),
    PaperRow("PIQA", "piqa", 0, "acc_norm", 83.0),
    PaperRow("ARC-e", "arc_easy", 0, "acc_norm", 80.0),
    PaperRow("ARC-c", "arc_challenge", 0, "acc_norm", 55.5),
)


def run_table(lm: Any, rows: Sequence[PaperRow] = PAPER_TABLE, *, limit: int | None = None,
              task_manager: Any = None) -> dict[str, float]:
    """Evaluate `lm` (a Mistral7BLM) on each row's task; {row name: percent}."""
    import lm_eval

    out = {}
    for row in rows:
        results = lm_eval.simple_evaluate(model=lm, tasks=[row.task], num_fewshot=row.shots,
                                          limit=limit, task_manager=task_manager,
                                          log_samples=False, bootstrap_iters=0)
        out[row.name] = 100.0 * metric_of(results["results"], row.task, row.metric)
    return out


def metric_of(results: dict[str, Any], task: str, metric: str) -> float:
    """A metric from lm-eval's results dict (keys like "acc,none")."""
    entry = results.get(task)
    if entry is None:
        raise KeyError(f"lm-eval returned no results for {task!r}")
    for key in (f"{metric},none", metric):
        if key in entry:
            return float(entry[key])
    raise KeyError(f"{task}: no {metric!r} among {sorted(entry)}")


def format_table(measured: dict[str, float], rows: Sequence[PaperRow] = PAPER_TABLE,
                 *, label: str = "mistral7b") -> str:
    """The table, ours beside the paper's, one row per task."""
    head = f"{'task':<12}{'shots':>6}  {'metric':<9}{label:>11}{'paper':>8}{'diff':>8}"
    lines = [head, "-" * len(head)]
    for row in rows:
        if row.name in measured:
            ours = measured[row.name]
            lines.append(f"{row.name:<12}{row.shots:>6}  {row.metric:<9}{ours:>11.1f}"
                         f"{row.paper:>8.1f}{ours - row.paper:>+8.1f}")
        else:
            lines.append(f"{row.name:<12}{row.shots:>6}  {row.metric:<9}{'-':>11}"
                         f"{row.paper:>8.1f}{'':>8}")
    return "\n".join(lines)


def select_rows(names: str | None) -> list[PaperRow]:
    if not names:
        return list(PAPER_TABLE)
    by_key = {r.task: r for r in PAPER_TABLE} | {r.name.lower(): r for r in PAPER_TABLE}
    rows = []
    for name in names.split(","):
        row = by_key.get(name.strip().lower())
        if row is None:
            raise InputError(f"unknown task {name!r}: choose from "
                             f"{', '.join(r.task for r in PAPER_TABLE)}")
        rows.append(row)
    return rows


def evaluate(llm: LLM, rows: Sequence[PaperRow] = PAPER_TABLE, *, limit: int | None = None,
             batch_size: int = 8, include_path: str | None = None) -> dict[str, float]:
    """Run `rows` on a loaded model through lm-eval; {row name: percent}. `include_path`: an
    extra lm-eval task folder (e.g. tasks that read local copies of the datasets)."""
    from lm_eval.tasks import TaskManager

    from mistral7b.eval.lm_eval_model import Mistral7BLM

    lm = Mistral7BLM(llm=llm, batch_size=batch_size)
    manager = TaskManager(include_path=include_path) if include_path else None
    return run_table(lm, rows, limit=limit, task_manager=manager)
