"""The fuzz suite's short, deterministic run: every target, 0 defects (issue 14).

Each mutant runs in a forked child under a time and memory limit (fuzz_harness.py); the
outcome is "ok" (loaded with finite logits / served), "rejected" (a clean Mistral7BError) or
a defect. The long run is `python tests/fuzz/run_fuzz.py` (README, "Untrusted input").
"""

from __future__ import annotations

import fuzz_harness
import pytest

COUNTS = {"gguf": 120, "tokenizer": 40, "safetensors": 40, "config.json": 40,
          "params.json": 40, "chat": 40, "jsonl": 40}


@pytest.fixture(scope="module")
def targets(tmp_path_factory):
    return fuzz_harness.Targets(tmp_path_factory.mktemp("fuzz"), seed=14)


def test_short_fuzz_run_has_no_defects(targets):
    summary = fuzz_harness.run(targets, COUNTS, timeout_s=20.0, memory_mb=1024, jobs=2)
    report = "\n".join(f"{d.target}#{d.index}: {d.detail}" for d in summary.defects)
    assert not summary.defects, f"{summary.table()}\n{report}"
    for target, n in COUNTS.items():
        counts = summary.counts[target]
        assert sum(counts.values()) == n
        # the mutations reach both sides: some mutants still load, most are refused
        assert counts[fuzz_harness.REJECTED] > 0, target


def test_the_seeds_load_with_finite_logits(targets):
    for name in ("gguf_f32", "gguf_q", "hf", "consolidated"):
        path = targets.seeds[name]
        chat = name.startswith("gguf")
        result = fuzz_harness.run_one(name, 0, lambda p=path, c=chat: fuzz_harness._load_and_check(
            p, chat=c), timeout_s=20.0, memory_mb=1024)
        assert result.outcome == fuzz_harness.OK, result.detail


def test_a_hang_and_a_crash_are_defects():
    import os
    import time

    hang = fuzz_harness.run_one("t", 0, lambda: time.sleep(60), timeout_s=1.0, memory_mb=256)
    assert hang.outcome == fuzz_harness.DEFECT and "hang" in hang.detail
    crash = fuzz_harness.run_one("t", 1, lambda: os.abort(), timeout_s=10.0, memory_mb=256)
    assert crash.outcome == fuzz_harness.DEFECT and "crash" in crash.detail
    raw = fuzz_harness.run_one("t", 2, lambda: int("x"), timeout_s=10.0, memory_mb=256)
    assert raw.outcome == fuzz_harness.DEFECT and "ValueError" in raw.detail
