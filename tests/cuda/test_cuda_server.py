"""On a CUDA GPU (skipped elsewhere; `pytest -m cuda`): `mistral7b serve --device cuda`
answers one chat request through the real openai client, streamed and not, with the greedy
text the CPU gives (float32 both sides), and on the int4 kernel (the default GGUF's own
blocks) with a well-formed answer."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

import mistral7b

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]

MESSAGES = [{"role": "user", "content": "Name three colours of the rainbow."}]


def _serve(tmp_path, *args):
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mistral7b.cli.serve", "-m", "default",
                                 "--port", "0", "--device", "cuda", *args],
                                stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
        if found:
            url = f"http://127.0.0.1:{found.group(1)}"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"server not ready:\n{log.read_text()}")


def _stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


@pytest.mark.parametrize("quant", ["none", "auto"])
def test_one_request_through_the_openai_client(tmp_path, quant):
    from openai import OpenAI

    proc, url = _serve(tmp_path, "--quant", quant, *(["--dtype", "float32"]
                                                     if quant == "none" else []))
    try:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
        reply = client.chat.completions.create(model="default", messages=MESSAGES,
                                               max_tokens=24, temperature=0)
        text = reply.choices[0].message.content
        assert reply.usage.completion_tokens > 0 and text
        stream = client.chat.completions.create(model="default", messages=MESSAGES,
                                                max_tokens=24, temperature=0, stream=True)
        streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert streamed == text
        if quant == "none":
            cpu = mistral7b.load("default", device="cpu", dtype="float32")
            assert text == cpu.chat(MESSAGES, max_tokens=24).text
    finally:
        assert _stop(proc) == 0
