"""The embedded default model against outputs of HF transformers and llama.cpp (tests/reference)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from reference_files import SMOLLM2
from tolerance import assert_close

import mistral7b

REF = SMOLLM2


@pytest.fixture(scope="module")
def reference():
    return json.loads((REF / "reference.json").read_text())


@pytest.fixture(scope="module")
def llm():
    return mistral7b.load("default", device="cpu", dtype="float32")


@pytest.mark.parametrize("chunk", [None, 1, 7])
def test_logits_match_the_float32_reference(llm, reference, chunk):
    ids = reference["capitals"]["ids"]
    hf = torch.from_numpy(np.load(REF / reference["capitals"]["hf_fp32_logits"]))
    llama_cpp = np.load(REF / reference["capitals"]["llamacpp_logits"])
    out = llm.logits(ids, chunk_size=chunk)
    assert out.shape == hf.shape
    # two float32 programs, summing in different orders (measured: 2e-6 of the scale)
    assert_close(out, hf, what=f"chunk {chunk}")
    assert out.argmax(-1).tolist() == llama_cpp.argmax(-1).tolist()
    assert out.argmax(-1).tolist() == reference["capitals"]["llamacpp_argmax"]
