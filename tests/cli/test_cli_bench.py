"""`mistral7b bench` on the default model: it runs its engine in a worker process and reports
its figures (no speed is asserted), including which decode step ran, the OpenMP wait policy
and the machine's read bandwidth beside decode's, read again before every run."""

from __future__ import annotations

import json
import os

import pytest
from cli_helpers import cli_env, run_cli

from mistral7b.kernels import native

KEYS = {"prefill_tps", "decode_tps", "ttft_s", "peak_rss_gb", "bandwidth_gbs", "load_s",
        "decode_step", "kernels", "tokens", "prefill_page_faults"}


@pytest.mark.parametrize("fused", ["1", "0"])
def test_bench_reports_its_figures_and_the_decode_step(fused):
    run = run_cli("bench", "--prompt-tokens", "8", "--gen-tokens", "4", "--repeat", "2",
                  "-t", "1", "--json", env=cli_env(MISTRAL7B_FUSED_STEP=fused))
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout)
    ours = results["mistral7b"]
    assert KEYS <= ours.keys()
    # the machine's read bandwidth, measured in the same run, and decode's share of it
    assert results["machine"]["read_gbs"] > 0 and ours["machine_read_gbs"] > 0
    assert len(ours["runs"]) == 2 and all(r["machine_read_gbs"] > 0 for r in ours["runs"])
    assert "machine read bandwidth" in run.stderr and "decode streams" in run.stderr
    # the OpenMP wait policy the engines ran under (the suite sets PASSIVE: conftest.py)
    assert results["machine"]["omp_wait_policy"] == os.environ["OMP_WAIT_POLICY"]
    assert f"OMP_WAIT_POLICY: {os.environ['OMP_WAIT_POLICY']}" in run.stderr
    assert ours["decode_tps"] > 0 and ours["prefill_tps"] > 0 and len(ours["tokens"]) == 4
    expect = "fused" if fused == "1" and native.ops() is not None else "eager"
    assert ours["decode_step"] == expect
    assert ours["kernels"] == (native.ops().isa() if native.ops() is not None else "torch")


def test_a_worker_that_fails_to_load_is_reported(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))        # a header and nothing after it
    run = run_cli("bench", "-m", str(bad), "--repeat", "1", "-t", "1")
    assert run.returncode != 0
    assert "the mistral7b benchmark failed" in run.stderr
    assert "bad.gguf" in run.stderr             # the worker's own error, passed on
