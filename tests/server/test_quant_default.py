"""`serve` runs a quantized GGUF on its own blocks by default (--quant auto), as the CLI does:
a greedy answer equals the Python API's `load(path, quant="auto")`, whose layers are the int4
kernel's; `--quant none` serves float weights, equal to `load(path)`."""

from __future__ import annotations

import httpx
import pytest
import torch
from conftest import ServerProcess

import mistral7b

PROMPT = "The three primary colours are"


def _complete(srv: ServerProcess) -> list[int]:
    r = httpx.post(f"{srv.url}/v1/completions", timeout=120, json={
        "model": "default", "prompt": PROMPT, "max_tokens": 12, "temperature": 0,
        "logprobs": 0})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


@pytest.mark.parametrize("flags, quant", [([], "auto"), (["--quant", "none"], None)])
def test_served_weights_follow_quant(tmp_path, flags, quant):
    llm = mistral7b.load("default", quant=quant)
    kinds = {type(m).__name__ for m in llm.model.modules()}
    assert ("Int4Linear" in kinds) == (quant == "auto")
    want = llm.generate(PROMPT, max_tokens=12).text
    # the thread count of this process: float sums (attention) may round differently with
    # another, and the int4 kernel's activation rounding can turn that into another token
    threads = ["-t", str(torch.get_num_threads())]
    srv = ServerProcess(flags + threads, tmp_path / "server.log").wait_ready()
    try:
        assert _complete(srv) == want
    finally:
        assert srv.stop() == 0, srv.log()
