"""`--tp 2` on the command line and the server: the same greedy ids as one process; a rank
that dies takes the run down with a clear message and leaves no process behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time

import httpx
import psutil
import pytest
from tiny_models import mistral_v3_folder
from tp_helpers import CLI, finish, start_ranks

import mistral7b

PROMPT = "The capital of France is"
TIMEOUT_S = 8          # MISTRAL7B_COLLECTIVE_TIMEOUT in the failure tests


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny Mistral with the v3 tokenizer: 2 query heads, 1 kv head, so tp=2 also
    replicates the kv head (tp > n_kv_heads)."""
    return mistral_v3_folder(tmp_path_factory.mktemp("v3"))


@pytest.fixture(scope="module")
def one(folder):
    return mistral7b.load(folder)


def _descendants_gone(pids: list[int], timeout: float = 30) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        alive = [p for p in alive if psutil.pid_exists(p)
                 and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.1)
    return alive


def test_generate_tp2_gives_the_single_process_ids(folder, one):
    want = one.generate(PROMPT, max_tokens=16, temperature=0.0)
    run = subprocess.run([*CLI, "generate", "-m", str(folder), PROMPT, "--max-tokens", "16",
                          "--temperature", "0", "--json", "--tp", "2"],
                         check=False, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    got = json.loads(run.stdout)
    assert got["token_ids"] == want.token_ids
    assert got["text"] == want.text


def test_bench_tp2_measures_rank_0_and_leaves_no_rank_behind(folder):
    # rank 0 takes the bench's commands; the other rank follows its calls until it exits
    run = subprocess.run([*CLI, "bench", "-m", str(folder), "--prompt-tokens", "6",
                          "--gen-tokens", "3", "--repeat", "2", "--json", "--tp", "2",
                          "-t", "2"], check=False, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    ours = json.loads(run.stdout)["mistral7b"]
    assert len(ours["runs"]) == 2 and ours["decode_tps"] > 0 and len(ours["tokens"]) == 3
    left = [p.pid for p in psutil.process_iter(["cmdline"])
            if "--worker" in (p.info["cmdline"] or []) and str(folder) in p.info["cmdline"]]
    assert _descendants_gone(left) == []


def test_serve_tp2_answers_as_one_process(folder, one, tmp_path):
    """Rank 0 serves HTTP; the repeated prompt and n=2 reuse and fork cached KV blocks,
    which the other rank must mirror. The server first sits idle for longer than the
    collective timeout: a worker waiting for the next call must not give up."""
    import openai

    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        proc = subprocess.Popen([*CLI, "serve", "-m", str(folder), "--port", "0", "--tp", "2",
                                 "--no-access-log"], stdout=subprocess.DEVNULL, stderr=err,
                                env={**os.environ, "MISTRAL7B_COLLECTIVE_TIMEOUT": "4"})
    pids = [proc.pid]
    try:
        deadline = time.monotonic() + 240
        port = None
        while port is None and time.monotonic() < deadline:
            found = re.search(r"listening on http://127\.0\.0\.1:(\d+)", log.read_text())
            port = int(found.group(1)) if found else None
            assert proc.poll() is None, log.read_text()
            time.sleep(0.2)
        pids += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
        while httpx.get(f"http://127.0.0.1:{port}/health").status_code != 200:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                               timeout=120)
        name = client.models.list().data[0].id
        time.sleep(6)                               # idle beyond the collective timeout
        want = one.generate(PROMPT, max_tokens=12, temperature=0.0).text
        for _ in range(2):
            got = client.completions.create(model=name, prompt=PROMPT, max_tokens=12,
                                            temperature=0)
            assert got.choices[0].text == want
        both = client.completions.create(model=name, prompt=PROMPT, max_tokens=12,
                                         temperature=0, n=2)
        assert [c.text for c in both.choices] == [want, want]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    assert _descendants_gone(pids) == [], log.read_text()[-3000:]


@pytest.mark.parametrize("victim", [1, 0])
def test_a_rank_killed_mid_generation_ends_the_other_with_a_clear_error(folder, victim):
    procs = start_ranks(lambda r: [*CLI, "generate", "-m", str(folder), PROMPT,
                                   "--max-tokens", "480", "--temperature", "0"],
                        MISTRAL7B_COLLECTIVE_TIMEOUT=str(TIMEOUT_S))
    try:
        assert procs[0].stdout.read(1)          # generation has started
        procs[victim].kill()
        started = time.monotonic()
        other = procs[1 - victim]
        other.wait(timeout=TIMEOUT_S + 20)
        assert time.monotonic() - started < TIMEOUT_S + 20
    finally:
        results = finish(procs)
    code, _, stderr = results[1 - victim]
    assert code != 0
    assert "tensor parallel: rank" in stderr and "lost the group" in stderr, stderr[-2000:]


@pytest.mark.parametrize("how", ["a rank killed", "Ctrl-C"])
def test_torchrun_leaves_no_rank_behind(folder, how):
    launcher = subprocess.Popen([*CLI, "generate", "-m", str(folder), PROMPT, "--max-tokens",
                                 "480", "--temperature", "0", "--tp", "2"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True,   # a group of its own, as a terminal's
                                env={**os.environ,
                                     "MISTRAL7B_COLLECTIVE_TIMEOUT": str(TIMEOUT_S)})
    try:
        assert launcher.stdout.read(1)
        tree = psutil.Process(launcher.pid).children(recursive=True)
        ranks = {int(p.environ()["RANK"]): p for p in tree if "RANK" in p.environ()}
        assert sorted(ranks) == [0, 1]
        if how == "a rank killed":
            ranks[1].kill()
        else:
            os.killpg(launcher.pid, signal.SIGINT)     # Ctrl-C: the whole process group
        launcher.wait(timeout=TIMEOUT_S + 60)
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.communicate()
    assert launcher.returncode != 0
    assert _descendants_gone([p.pid for p in tree]) == []
