"""`serve --speculate N`: answers equal plain greedy decoding (float weights, where that is
exact), concurrent requests included, and /metrics counts the drafts."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import torch
from conftest import ServerProcess

import mistral7b

PROMPTS = ["Copy this list exactly: red, green, blue, yellow, red, green, blue, yellow, red,",
           "Repeat after me: one two three, one two three, one two three, one",
           "The capital of France is"]


def test_speculative_server_equals_plain_greedy(tmp_path):
    llm = mistral7b.load("default")
    want = [llm.generate(p, max_tokens=20).text for p in PROMPTS]
    threads = ["-t", str(torch.get_num_threads())]
    srv = ServerProcess(["--quant", "none", "--speculate", "4", *threads],
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
    finally:
        assert srv.stop() == 0, srv.log()


def test_draft_model_server_equals_plain_greedy(tmp_path):
    """`serve --draft-model default`: the default model's int4 blocks draft for its float
    weights, for every request; answers equal plain greedy, /health names the draft and
    /metrics counts accepted drafts."""
    llm = mistral7b.load("default")
    want = [llm.generate(p, max_tokens=20).text for p in PROMPTS]
    threads = ["-t", str(torch.get_num_threads())]
    srv = ServerProcess(["--quant", "none", "--draft-model", "default", *threads],
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
        health = httpx.get(f"{srv.url}/health", timeout=30).json()
        assert health == {"status": "ok", "draft_model": "default"}
        metrics = httpx.get(f"{srv.url}/metrics", timeout=30).text
        accepted = [line for line in metrics.splitlines()
                    if line.startswith("mistral7b_spec_accepted_tokens_total")]
        assert accepted and float(accepted[0].split()[-1]) > 0, metrics
    finally:
        assert srv.stop() == 0, srv.log()
