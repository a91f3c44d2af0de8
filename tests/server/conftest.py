"""Real servers in subprocesses (`python -m mistral7b.cli.serve`) on free loopback ports.

One shared server (`server`) serves most tests; tests that kill their server start their own.
The server picks its port (`--port 0`) and logs it, so there is no race for a free port.
Its stderr goes to a file (a full pipe would block the server).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

API_KEY = "test-key-123"
ALLOWED_ORIGIN = "http://allowed.example"
LOAD_TIMEOUT_S = 180
KEEPALIVE_S = 0.1         # short, so a long pre-fill shows the keep-alive comments


class ServerProcess:
    def __init__(self, args: list[str], log_path: Path, env: dict[str, str] | None = None):
        self.log_path = log_path
        self.log_file = log_path.open("wb")
        cmd = [sys.executable, "-m", "mistral7b.cli.serve", "-m", "default", "--port", "0",
               "-t", "1", "--no-access-log", "--log-level", "debug", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log_file,
                                     env={**os.environ, **(env or {})})
        self.port = self._wait_for_port()
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def _wait_for_port(self) -> int:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", self.log())
            if found:
                return int(found.group(1))
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.05)
        raise RuntimeError(f"server did not start:\n{self.log()}")

    def wait_ready(self) -> ServerProcess:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server not ready after {LOAD_TIMEOUT_S} s:\n{self.log()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log_file.close()
        return self.proc.returncode


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """The shared server: API key from the environment, CORS for one origin, small limits.

    A step cannot be interrupted, so how fast a server reacts (the storm test's "answers
    within a second") is bounded by its longest step: on a 2-core shared machine a 256-token
    pre-fill step takes ~1.5 s, a 32-token one ~0.2 s. Hence --prefill-chunk 32 here.

    Float weights (--quant none, not the default auto): tests here check exact invariants
    (batched = alone, n choices = seeded single runs), and the int4 kernel quantizes
    activations, so float differences of 1e-7 between a batched and a lone attention can
    flip a rounding step and then a greedy near-tie. test_quant_default.py covers auto.
    """
    log = tmp_path_factory.mktemp("server") / "server.log"
    srv = ServerProcess(["--max-concurrency", "16", "--max-queue", "64", "--max-model-len",
                         "384", "--max-n", "4", "--max-body-bytes", "65536",
                         "--cors-origin", ALLOWED_ORIGIN, "--prefill-chunk", "32",
                         "--quant", "none",
                         "--sse-keepalive", str(KEEPALIVE_S)],
                        log, env={"MISTRAL7B_API_KEY": API_KEY})
    try:
        yield srv.wait_ready()
    finally:
        assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="session")
def headers():
    return {"Authorization": f"Bearer {API_KEY}"}


@pytest.fixture
def http(server, headers):
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        yield client


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def metric(http: httpx.Client, name: str) -> float:
    text = http.get("/metrics").text
    found = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    assert found, f"{name} not in /metrics"
    return float(found.group(1))
