"""A server's life cycle: 503 while loading, per-request timeout, a full queue, SIGTERM
during streams
(every client gets a clean end or an error event, exit code 0, no process left behind), and
the warning for a public address without a key."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from conftest import ServerProcess

GRACE_S = 1.0
LONG = {"max_tokens": 400, "temperature": 0.0, "ignore_eos": True}


@pytest.fixture(scope="module")
def fresh(tmp_path_factory):
    """Not waited for: the first test sees it loading. Killed by the SIGTERM test."""
    log = tmp_path_factory.mktemp("shutdown") / "server.log"
    srv = ServerProcess(["--max-concurrency", "4", "--max-queue", "2", "--max-model-len", "512",
                         "--timeout", "3",
                         "--shutdown-grace", str(GRACE_S)], log)
    yield srv
    srv.stop()


def test_health_is_503_while_loading(fresh):
    r = httpx.get(f"{fresh.url}/health")
    assert r.status_code == 503, "the model loaded before the first check (too fast?)"
    assert r.json()["error"]["code"] == "model_loading"
    r = httpx.post(f"{fresh.url}/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    fresh.wait_ready()
    assert httpx.get(f"{fresh.url}/health").json() == {"status": "ok"}


def test_request_timeout(fresh):
    fresh.wait_ready()
    t0 = time.monotonic()
    r = httpx.post(f"{fresh.url}/v1/completions", json={"prompt": "Count:", **LONG}, timeout=30)
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "timeout"
    assert 3 <= time.monotonic() - t0 < 10


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


async def _stream(url: str, i: int) -> list[dict | str]:
    """The SSE events of one chat stream: parsed JSON objects, and "[DONE]"."""
    events: list[dict | str] = []
    payload = {"messages": [{"role": "user", "content": f"Tell story number {i}."}],
               "stream": True, **LONG}
    async with (httpx.AsyncClient(timeout=30) as client,
                client.stream("POST", f"{url}/v1/chat/completions", json=payload) as r):
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line[len("data: "):]
                events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_sigterm_during_streams(fresh):
    fresh.wait_ready()
    before = _children(fresh.pid)

    async def scenario() -> list[list]:
        # six streams on four rows: four decoding and two queued when SIGTERM arrives
        tasks = [asyncio.create_task(_stream(fresh.url, i)) for i in range(6)]
        async with httpx.AsyncClient() as client:
            for _ in range(200):
                metrics = (await client.get(f"{fresh.url}/metrics")).text
                if ("mistral7b_running_sequences 4.0" in metrics
                        and "mistral7b_queue_depth 2.0" in metrics):
                    break
                await asyncio.sleep(0.05)
            full = await client.post(f"{fresh.url}/v1/completions", json={"prompt": "hi"})
        assert full.status_code == 503, full.text
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["code"] == "server_overloaded"
        os.kill(fresh.pid, signal.SIGTERM)
        return await asyncio.gather(*tasks)

    t0 = time.monotonic()
    streams = asyncio.run(scenario())
    for events in streams:
        assert events[-1] == "[DONE]", events[-3:]
        last = events[-2]
        clean = "choices" in last and last["choices"] and last["choices"][0]["finish_reason"]
        error = "error" in last and last["error"]["code"] == "shutdown"
        assert clean or error, last
    assert sum("error" in s[-2] for s in streams) >= 2     # the queued ones at least
    assert fresh.proc.wait(timeout=30) == 0
    assert time.monotonic() - t0 < GRACE_S + 15
    assert all(not Path(f"/proc/{pid}").exists() for pid in before)
    assert "Traceback" not in fresh.log()
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{fresh.url}/health", timeout=2)


def test_public_address_without_a_key_warns(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MISTRAL7B_API_KEY"}
    done = subprocess.run([sys.executable, "-m", "mistral7b.cli.serve", "--host", "0.0.0.0",
                           "-m", str(tmp_path / "missing-model")], capture_output=True,
                          text=True, env=env, timeout=120, check=False)
    assert done.returncode == 2
    assert "warning: listening on 0.0.0.0 without an API key" in done.stderr
    assert "error: " in done.stderr and "missing-model" in done.stderr
