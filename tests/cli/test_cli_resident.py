"""`generate` / `chat` / `run` answered by a running `mistral7b serve` (cli/remote.py), `ps`,
and the servers' registry (servers.py).

Each server here is a real `mistral7b serve` subprocess on the default model, registered in a
MISTRAL7B_HOME of its own (so no test finds another test's server); the reference for what a
served command prints is the same command run with --local. The served server runs without
its prefix cache: KV reused from an earlier request is computed by other kernel calls (int4
pre-fill vs decode), which may flip a near tie in a greedy answer, and a fresh --local
process never reuses anything either.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cli_helpers import CLI, assert_user_error, cli_env, run_cli

from mistral7b import servers

PROMPT = "The capital of France is"
START_TIMEOUT_S = 180


class Serve:
    """`mistral7b serve -m default --port 0` registered under `home`; ready once its entry
    is written (the model has loaded)."""

    def __init__(self, home: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.home = home
        self.env = cli_env(MISTRAL7B_HOME=str(home), **(env or {}))
        self.log_path = home / f"serve-{time.monotonic_ns()}.log"
        home.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [*CLI, "serve", "-m", "default", "--port", "0", "-t", "1", "--no-access-log",
                 *args], stdout=subprocess.DEVNULL, stderr=log, env=self.env)
        self.entry_path = home / "servers" / f"{self.proc.pid}.json"
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.entry_path.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"serve did not start:\n{self.log_path.read_text()}")
            time.sleep(0.1)
        self.entry = servers.ServerEntry.from_json(self.entry_path.read_text())

    def cli(self, *args: str, **kwargs) -> subprocess.CompletedProcess[str]:
        return run_cli(*args, env=self.env, **kwargs)

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Serve(tmp_path_factory.mktemp("resident"), "--no-prefix-cache")
    yield s
    s.stop()


def served_by(server: Serve) -> str:
    return f"served by {server.entry.url} (pid {server.entry.pid})"


# ------------------------------------------------------------------------ served = local


def test_generate_through_the_server_prints_what_local_prints(server):
    served = server.cli("generate", PROMPT, "-n", "24")
    local = server.cli("generate", PROMPT, "-n", "24", "--local")
    assert served.returncode == 0 and local.returncode == 0, (served.stderr, local.stderr)
    assert served.stdout == local.stdout and served.stdout.strip()
    assert served_by(server) in served.stderr
    assert "served by" not in local.stderr and "loading default" in local.stderr
    # The summary's figures come from the server's usage: the prompt's tokens counted
    assert "prompt 5 tok" in served.stderr and "generated" in served.stderr


def test_sampling_flags_and_chat_format_are_carried(server):
    args = ("generate", "Name three colours.", "--chat", "--system", "Answer briefly.",
            "-n", "16", "--temperature", "0.8", "--top-k", "20", "--seed", "7", "--stop", ".")
    served, local = server.cli(*args), server.cli(*args, "--local")
    assert served.returncode == 0 and local.returncode == 0, (served.stderr, local.stderr)
    assert served.stdout == local.stdout
    assert served_by(server) in served.stderr


def test_chat_turn_through_the_server_is_the_local_answer(server):
    served = server.cli("chat", "-n", "24", "--verbose", input="What is 2+2?\n")
    local = server.cli("chat", "-n", "24", "--local", input="What is 2+2?\n")
    assert served.returncode == 0 and local.returncode == 0, (served.stderr, local.stderr)
    assert served.stdout == local.stdout and served.stdout.strip()
    assert served_by(server) in served.stderr


def test_run_uses_the_server_too(server):
    served = server.cli("run", "default", "What is 2+2?", "-n", "12")
    local = server.cli("generate", "--chat", "What is 2+2?", "-n", "12", "--local")
    assert served.returncode == 0, served.stderr
    assert served.stdout == local.stdout
    assert served_by(server) in served.stderr


def test_the_client_path_never_imports_torch(server):
    code = ("import sys\n"
            "from mistral7b.cli.main import main\n"
            f"rc = main(['generate', {PROMPT!r}, '-n', '4'])\n"
            "heavy = [m for m in ('torch', 'transformers', 'tokenizers') if m in sys.modules]\n"
            "print('RESULT', rc, heavy)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=server.env, timeout=120, check=False)
    assert "RESULT 0 []" in out.stdout, (out.stdout, out.stderr)
    assert served_by(server) in out.stderr


# ------------------------------------------------------------------------ runs locally


@pytest.mark.parametrize("flags", [("--quant", "none"), ("-t", "1"), ("--json",),
                                   ("--temperature", "2.5", "--seed", "1")])
def test_another_model_or_a_flag_the_api_lacks_runs_locally(server, flags):
    result = server.cli("generate", PROMPT, "-n", "2", *flags)
    assert result.returncode == 0, result.stderr
    assert "served by" not in result.stderr


def test_host_forces_a_server_and_a_closed_port_is_a_clear_error(server):
    forced = server.cli("generate", PROMPT, "-n", "4", "--quant", "none", "--host",
                        server.entry.url)
    assert forced.returncode == 0 and served_by(server) in forced.stderr
    with_env = run_cli("generate", PROMPT, "-n", "4",
                       env={**server.env, "MISTRAL7B_HOST": server.entry.url})
    assert served_by(server) in with_env.stderr
    closed = server.cli("generate", PROMPT, "--host", "http://127.0.0.1:9")
    assert_user_error(closed, "no mistral7b server answers at http://127.0.0.1:9",
                      "mistral7b serve", "drop --host")
    lacking = server.cli("generate", PROMPT, "--json", "--host", server.entry.url)
    assert_user_error(lacking, "--json", "drop --host")


def test_a_refused_request_is_the_local_error_line(tmp_path):
    server = Serve(tmp_path / "home", "--max-model-len", "16")
    try:
        long_prompt = "one two three four five six seven eight nine ten " * 3
        served = server.cli("generate", long_prompt, "-c", "16")
        local = server.cli("generate", long_prompt, "-c", "16", "--local")
    finally:
        server.stop()
    line = assert_user_error(served, "tokens but the context is 16")
    assert line == assert_user_error(local)


def long_answer(server: Serve) -> subprocess.Popen[str]:
    """A served `generate` that streams for a long time, once its first bytes came."""
    client = subprocess.Popen([*CLI, "generate", PROMPT, "-n", "4000", "--ignore-eos"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=server.env)
    assert client.stdout is not None
    client.stdout.read(8)
    return client


def _running_sequences(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(x for x in text.splitlines() if x.startswith("mistral7b_running_sequences "))
    return float(line.split()[1])


def test_ctrl_c_closes_the_request_and_the_server_frees_it(server):
    client = long_answer(server)
    try:
        assert _running_sequences(server.entry.url) == 1
        client.send_signal(signal.SIGINT)
        _, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    assert client.returncode == 130 and "interrupted" in err and "Traceback" not in err
    deadline = time.monotonic() + 30
    while _running_sequences(server.entry.url) != 0:
        assert time.monotonic() < deadline, "the server kept decoding for a gone client"
        time.sleep(0.1)


def test_a_server_with_an_api_key(tmp_path):
    server = Serve(tmp_path / "home", env={"MISTRAL7B_API_KEY": "sk-test"})
    try:
        assert server.entry.api_key_required
        assert "sk-test" not in server.entry_path.read_text()
        keyed = server.cli("generate", PROMPT, "-n", "4", "--api-key", "sk-test")
        no_key = run_cli("generate", PROMPT, "-n", "4", env=cli_env(
            MISTRAL7B_HOME=str(server.home)))
        wrong = server.cli("generate", PROMPT, "-n", "4", "--host", server.entry.url,
                           "--api-key", "nope")
    finally:
        server.stop()
    assert keyed.returncode == 0 and served_by(server) in keyed.stderr
    assert no_key.returncode == 0 and "served by" not in no_key.stderr   # runs here instead
    assert no_key.stdout == keyed.stdout
    assert_user_error(wrong, "needs an API key", "--api-key")


# ------------------------------------------------------------------------ the registry


def test_entry_ps_and_removal_when_the_server_stops(tmp_path):
    server = Serve(tmp_path / "home")
    entry = server.entry
    assert entry.pid == server.proc.pid and entry.model == "default"
    assert entry.quant == "int4" and entry.quant_flag == "auto" and not entry.api_key_required
    listed = server.cli("ps")
    assert listed.returncode == 0 and entry.url in listed.stdout
    assert str(entry.pid) in listed.stdout and "default" in listed.stdout
    as_json = [json.loads(line) for line in server.cli("ps", "--json").stdout.splitlines()]
    assert [e["pid"] for e in as_json] == [entry.pid]
    assert server.stop() == 0
    assert not server.entry_path.exists()
    assert server.cli("ps", "--json").stdout == ""


def test_a_dead_servers_entry_is_ignored_and_removed(tmp_path):
    home = tmp_path / "home"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (home / "servers").mkdir(parents=True)
    stale = home / "servers" / f"{dead.pid}.json"
    stale.write_text(json.dumps({
        "url": "http://127.0.0.1:9", "pid": dead.pid, "started": time.time(),
        "model": "default", "path": "x", "quant_flag": "auto", "quant": "int4",
        "dtype_flag": None, "dtype": "float32", "device": "cpu"}))
    result = run_cli("generate", PROMPT, "-n", "2", env=cli_env(MISTRAL7B_HOME=str(home)))
    assert result.returncode == 0 and "served by" not in result.stderr, result.stderr
    assert not stale.exists()


def test_the_server_dying_mid_answer_is_one_error_line(tmp_path):
    server = Serve(tmp_path / "home", "--no-prefix-cache")
    client = long_answer(server)
    try:
        server.stop(signal.SIGKILL)
        _, err = client.communicate(timeout=60)
    finally:
        if client.poll() is None:
            client.kill()
    result = subprocess.CompletedProcess(client.args, client.returncode, "", err)
    assert_user_error(result, "stopped in the middle of the answer")
    assert server.entry_path.exists()            # killed: nobody removed it ...
    run_cli("ps", env=server.env)
    assert not server.entry_path.exists()        # ... until a client saw the pid is dead


# ------------------------------------------------------------------------ selection rules


def _entry(**changes) -> servers.ServerEntry:
    fields = {"url": "http://127.0.0.1:8000", "pid": os.getpid(), "started": time.time(),
              "model": "default", "path": "/m.gguf", "quant_flag": "auto", "quant": "int4",
              "dtype_flag": None, "dtype": "float32", "device": "cpu",
              "max_model_len": 8192, "trained_len": 8192, **changes}
    return servers.ServerEntry(**fields)


def _args(*argv: str):
    from mistral7b.cli.main import build_parser

    return build_parser(only=argv[0]).parse_args(list(argv))


def test_same_model_compares_what_would_load():
    from mistral7b.cli.remote import same_model

    assert same_model(_entry(), _args("generate", "x"), "/m.gguf")
    assert same_model(_entry(), _args("generate", "x", "--quant", "int4"), "/m.gguf")
    assert same_model(_entry(), _args("generate", "x", "--dtype", "float32"), "/m.gguf")
    assert not same_model(_entry(), _args("generate", "x"), "/other.gguf")
    assert not same_model(_entry(), _args("generate", "x", "--quant", "none"), "/m.gguf")
    assert not same_model(_entry(), _args("generate", "x", "--speculate", "3"), "/m.gguf")
    assert not same_model(_entry(), _args("generate", "x", "-c", "64"), "/m.gguf")
    assert same_model(_entry(max_model_len=64), _args("chat", "-c", "64"), "/m.gguf")
    assert not same_model(_entry(max_model_len=64), _args("chat"), "/m.gguf")
    assert not same_model(_entry(), _args("chat", "--lora", "/a"), "/m.gguf")


def test_registry_round_trip_and_liveness(tmp_path, monkeypatch):
    monkeypatch.setenv("MISTRAL7B_HOME", str(tmp_path))
    live = servers.register(_entry())
    (tmp_path / "servers" / "12.json").write_text("{not json")
    assert [e.pid for e in servers.running()] == [os.getpid()]
    assert not (tmp_path / "servers" / "12.json").exists()
    servers.unregister(os.getpid())
    assert not live.exists() and servers.running() == []
