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


def _until(what, check, proc, log, timeout=180.0):
    """check()'s first truthy value within `timeout` seconds, while the server lives."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the server exited:\n{log.read_text()}"
        value = check()
        if value:
            return value
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"{what} within {timeout:.0f} s:\n{log.read_text()}")


def _healthy(url):
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def _serve(tmp_path, *args):
    """A `serve --port 0` process on the GPU and its URL, once /health answers."""
    log = tmp_path / "server.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "mistral7b.cli.serve", "-m", "default",
                                 "--port", "0", "--device", "cuda", *args],
                                stdout=subprocess.DEVNULL, stderr=err, env=dict(os.environ))
    port = _until("no port", lambda: re.findall(r"listening on http://127\.0\.0\.1:(\d+)",
                                                log.read_text()), proc, log)[0]
    url = f"http://127.0.0.1:{port}"
    _until("not healthy", lambda: _healthy(url), proc, log)
    return proc, url


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
