"""`serve --speculate N` and `serve --draft-model MODEL`: answers equal plain greedy decoding
(float weights, where that is exact), concurrent requests included, and /metrics counts the
drafts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import ServerProcess

import mistral7b

PROMPTS = ["Copy this list exactly: red, green, blue, yellow, red, green, blue, yellow, red,",
           "Repeat after me: one two three, one two three, one two three, one",
           "The capital of France is"]


@pytest.mark.parametrize("flags", [["--speculate", "4"], ["--draft-model", "default"]],
                         ids=["lookup", "draft-model"])
def test_speculative_server_equals_plain_greedy(tmp_path, flags):
    """Prompt lookup, or the default model's int4 blocks (`--draft-quant auto`) drafting for
    its float weights: answers equal plain greedy, /metrics counts accepted drafts, and
    /health names a draft model."""
    llm = mistral7b.load("default")
    want = [llm.generate(p, max_tokens=20).text for p in PROMPTS]
    threads = ["-t", str(torch.get_num_threads())]
    srv = ServerProcess(["--quant", "none", *flags, *threads],
                        tmp_path / "server.log").wait_ready()
    try:
        def complete(prompt: str) -> str:
            r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
                "model": "default", "prompt": prompt, "max_tokens": 20, "temperature": 0})
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]

        with ThreadPoolExecutor(3) as pool:
            got = list(pool.map(complete, PROMPTS))
        assert got == want
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("mistral7b_spec_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0, metrics
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
        drafted = {"draft_model": "default"} if "--draft-model" in flags else {}
        assert health == {"status": "ok", **drafted}
    finally:
        assert srv.stop() == 0, srv.log()
