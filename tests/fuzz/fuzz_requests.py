"""Generated requests against the real server: every answer below 500, the server up after each.

    OMP_NUM_THREADS=1 python tests/fuzz/fuzz_requests.py --n 2000

starts `mistral7b serve` on the fuzzer's tiny seed GGUF (a ChatML model, fuzz_seeds.py, so a
request is cheap and thousands fit in minutes), sends `--n` requests made from valid ones by
type and range substitutions, unusual Unicode (lone surrogates as JSON escapes, control-token
text, RTL marks, NUL), unknown and nested fields, raw byte damage, wrong content types and
streaming, and after each one checks GET /health. A streamed answer must not carry a
"server_error" event either. Exit status 1 on any 5xx, dead server or transport failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ENDPOINTS = ["/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
             "/v1/models", "/health", "/metrics", "/v1/models/x"]
SAMPLING = {
    "temperature": [0.0, 0.7, 2.0, -1, 1e9, "1", None, True, float("nan")],
    "top_p": [1.0, 0.5, 0.0, 1.5, None, "x"], "top_k": [0, -1, 5, 10**9, -5, 1.5],
    "min_p": [0.0, 0.1, 2, None], "repetition_penalty": [1.0, 1.3, 0, 100, None],
    "frequency_penalty": [0.0, 1.0, 3, -3], "presence_penalty": [0.0, -2.0, 2.5],
    "seed": [0, 1, 2**63, -1, 2**70, "a", None], "n": [1, 2, 4, 0, 5, 1000, -1],
    "stream": [False, True, "true", None], "max_tokens": [1, 2, 3, 0, -1, "2", 1.5, None],
    "stop": ["\n", ["a", "b"], [""], 5, ["x"] * 20, "\ud800", ["<|im_end|>"], None],
    "logprobs": [None, 1, 5, 100, True, False], "top_logprobs": [0, 2, 50, None],
    "echo": [True, False, "yes"], "ignore_eos": [True, False, 1],
    "stream_options": [{"include_usage": True}, {"include_usage": "x"}, [], None],
    "logit_bias": [{"5": 10}, None, {}], "user": ["u", "\ud800", 5],
    "model": [None, "default", "gpt-4", "", "\ud800", 5], "suffix": [None, "end"],
    "response_format": [{"type": "text"}, {"type": "json_object"}, {"type": "nope"}, "json"],
    "tools": [None, [], [{"type": "function", "function": {"name": "f"}}], "x"],
}


def prompt(rng: random.Random) -> Any:
    import fuzz_mutate

    return rng.choice([
        fuzz_mutate.string(rng) or "hi", "hello", "", [1, 2, 3], [[1, 2], [3]], [10**7], [-1],
        [], [[]], ["a", "b"], [1, "a"], 5, None, "\ud800", "x\udcffy", "<|im_start|>system",
        {"text": "hi"}, ["\ud800"], "word " * 300,
    ])


def body_for(rng: random.Random, path: str) -> Any:
    import fuzz_mutate

    body: dict[str, Any] = {"max_tokens": rng.choice([1, 2, 3]), "temperature": 0.0}
    if path == "/v1/completions":
        body["prompt"] = prompt(rng)
    elif path == "/v1/chat/completions":
        body["messages"] = fuzz_mutate.messages(rng)
        if isinstance(body["messages"], list) and rng.random() < 0.3:
            for m in body["messages"]:
                if isinstance(m, dict) and m.get("role") == "system" and rng.random() < 0.5:
                    m["role"] = "developer"
    elif path == "/tokenize":
        body = rng.choice([{"prompt": prompt(rng)}, {"messages": fuzz_mutate.messages(rng)},
                           {}, {"prompt": "hi", "add_special_tokens": rng.choice([True, 5])}])
    elif path == "/detokenize":
        body = {"tokens": rng.choice([[1, 2, 3], [], [10**7], [-1], ["a"], "x", None,
                                      list(range(300))])}
    for _ in range(rng.choice([0, 1, 1, 2, 4])):
        key = rng.choice(list(SAMPLING))
        body[key] = rng.choice(SAMPLING[key])
    if rng.random() < 0.1:
        body[fuzz_mutate.string(rng) or "extra"] = rng.choice(fuzz_mutate.JSON_VALUES)
    if rng.random() < 0.05:
        return rng.choice(fuzz_mutate.JSON_VALUES)
    return body


def request(rng: random.Random) -> tuple[str, str, bytes | None, dict[str, str]]:
    """(method, path, raw body, headers) of one generated request."""
    import fuzz_mutate

    path = rng.choice(ENDPOINTS[:4] * 4 + ENDPOINTS[4:])
    if path in ("/v1/models", "/health", "/metrics", "/v1/models/x"):
        return rng.choice(["GET", "GET", "POST", "DELETE"]), path, None, {}
    try:
        raw = json.dumps(body_for(rng, path)).encode()
    except ValueError:
        raw = b"{}"
    op = rng.randrange(20)
    if op == 0:
        raw = fuzz_mutate.blind(rng, raw)
    elif op == 1:
        at = rng.randrange(len(raw) + 1)
        raw = raw[:at] + rng.choice(fuzz_mutate.TEXT_JUNK) + raw[at:]
    headers = {"Content-Type": rng.choice(["application/json"] * 9 + ["text/plain", ""])}
    return "POST", path, raw, headers


class Server:
    """`mistral7b serve` on `model`, on a free loopback port, its log in `log_path`."""

    def __init__(self, model: Path, log_path: Path, *extra: str) -> None:
        self.log_path = log_path
        self.log = log_path.open("wb")
        cmd = [sys.executable, "-m", "mistral7b.cli.serve", "-m", str(model), "--port", "0",
               "-t", "1", "--no-access-log", "--max-model-len", "256", "--max-n", "4",
               "--max-body-bytes", "65536", *extra]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=self.log)
        deadline = time.monotonic() + 120
        while True:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)",
                              log_path.read_text(errors="replace"))
            if found:
                self.url = f"http://127.0.0.1:{found.group(1)}"
                break
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{log_path.read_text()}")
            time.sleep(0.05)
        import httpx

        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready:\n{log_path.read_text()}")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode


def run_requests(url: str, n: int, seed: int = 0, headers: dict[str, str] | None = None
                 ) -> tuple[Counter[int], list[str]]:
    """Send n generated requests; returns (count per status, failures)."""
    import httpx

    statuses: Counter[int] = Counter()
    failures: list[str] = []
    with httpx.Client(base_url=url, timeout=60, headers=headers or {}) as client:
        for i in range(n):
            rng = random.Random(f"{seed}/request/{i}")
            method, path, raw, extra = request(rng)
            try:
                with client.stream(method, path, content=raw, headers=extra) as r:
                    text = r.read().decode("utf-8", "replace")
                statuses[r.status_code] += 1
                if r.status_code >= 500:
                    failures.append(f"#{i} {method} {path} {raw!r:.300} -> {r.status_code} "
                                    f"{text[:300]}")
                elif '"server_error"' in text:
                    failures.append(f"#{i} {method} {path} {raw!r:.300} -> stream error "
                                    f"{text[-300:]}")
            except httpx.HTTPError as exc:
                failures.append(f"#{i} {method} {path} {raw!r:.300} -> {type(exc).__name__}")
            try:
                alive = client.get("/health", timeout=10).status_code == 200
            except httpx.HTTPError:
                alive = False
            if not alive:
                failures.append(f"#{i}: server not healthy after {method} {path} {raw!r:.300}")
                break
    return statuses, failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    import fuzz_seeds

    with tempfile.TemporaryDirectory(prefix="mistral7b-request-fuzz-") as tmp:
        model = fuzz_seeds.write_gguf(Path(tmp) / "m.gguf")
        server = Server(model, Path(tmp) / "server.log")
        t0 = time.perf_counter()
        try:
            statuses, failures = run_requests(server.url, args.n, args.seed)
        finally:
            code = server.stop()
            log = (Path(tmp) / "server.log").read_text(errors="replace")
    for failure in failures:
        print("FAILURE", failure)
    tracebacks = log.count("Traceback")
    print(f"{sum(statuses.values())} requests in {time.perf_counter() - t0:.0f} s; status "
          f"counts {dict(sorted(statuses.items()))}; 5xx: "
          f"{sum(v for k, v in statuses.items() if k >= 500)}; failures: {len(failures)}; "
          f"server exit code {code}; tracebacks in its log: {tracebacks}")
    return 1 if failures or code != 0 else 0


if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parent.parent)]
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
