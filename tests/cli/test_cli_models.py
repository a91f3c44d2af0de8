"""Models by name: `pull` into a temporary store (a fake Hub, no network), then `-m ALIAS`,
`list`, `show`, `rm`, `create` and `run` against it, offline where the store should suffice."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
from cli_helpers import TerminalSession, assert_user_error, cli_env, run_cli
from fake_hub import FakeHub, hub_env
from safetensors import safe_open
from tiny_models import mistral_v3_folder

from mistral7b import store

ALIAS = "mistral-7b-instruct-v0.3"
REPO, PINNED = store.ALIASES[ALIAS]


@pytest.fixture(scope="module")
def tiny_v3(tmp_path_factory) -> Path:
    """A tiny random v0.3-shaped consolidated model with the real v3 tokenizer."""
    return mistral_v3_folder(tmp_path_factory.mktemp("tiny") / "model", seed=3)


@pytest.fixture
def hub(tiny_v3):
    server = FakeHub()
    # The Hub's commit for this repository is the one the alias is pinned to.
    server.add(REPO, {f.name: f.read_bytes() for f in tiny_v3.iterdir()}, sha=PINNED)
    server.start()
    yield server
    server.stop()


def dead_endpoint() -> str:
    with socket.socket() as s:      # a port that was free a moment ago: nothing listens
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def env_for(tmp_path: Path, endpoint: str, offline: bool = False, **extra: str) -> dict:
    env = hub_env(endpoint, tmp_path / "hf")
    env.update(MISTRAL7B_HOME=str(tmp_path / "m7b"), **extra)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def pull(tmp_path: Path, hub: FakeHub) -> Path:
    result = run_cli("pull", ALIAS, env=env_for(tmp_path, hub.url))
    assert result.returncode == 0, result.stderr
    return Path(result.stdout.strip())


def n_params(folder: Path) -> int:
    """Parameters counted from the safetensors header (independent of our config code)."""
    total = 0
    with safe_open(str(folder / "consolidated.safetensors"), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open is not iterable
            shape = f.get_slice(key).get_shape()
            count = 1
            for d in shape:
                count *= d
            total += count
    return total


def test_alias_is_pinned_and_resolves_offline_once_pulled(hub, tmp_path, tiny_v3):
    folder = pull(tmp_path, hub)
    assert folder == (tmp_path / "hf" / "hub" / "models--mistralai--Mistral-7B-Instruct-v0.3" /
                      "snapshots" / PINNED).resolve()
    # Every request named the pinned commit, never a branch.
    assert all(PINNED in path for _, path in hub.requests if "/resolve/" in path)
    hub.stop()
    offline = env_for(tmp_path, dead_endpoint(), offline=True)
    import mistral7b

    llm = mistral7b.load(tiny_v3)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    want = llm.generate(ids, max_tokens=5).token_ids
    for name in (ALIAS, REPO, "mistral"):
        result = run_cli("generate", "-m", name, "--chat", "Hello there", "-n", "5", "--json",
                         "-q", env=offline)
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["token_ids"] == want, name


def test_show_reads_the_pulled_model(hub, tmp_path, tiny_v3):
    folder = pull(tmp_path, hub)
    result = run_cli("show", ALIAS, "--json", env=env_for(tmp_path, hub.url, offline=True))
    assert result.returncode == 0, result.stderr
    page = json.loads(result.stdout)
    params = json.loads((tiny_v3 / "params.json").read_text())
    assert Path(page["path"]) == folder and page["revision"] == PINNED
    assert page["format"] == "consolidated" and page["quantization"] == "F32"
    assert page["parameters"] == n_params(tiny_v3)
    for key in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "rope_theta"):
        assert page["config"][key] == params[key], key
    assert page["config"]["sliding_window"] is None
    assert "v3" in page["tokenizer"] and "Mistral v3" in page["chat_format"]
    text = run_cli("show", ALIAS, env=env_for(tmp_path, hub.url, offline=True))
    assert "sliding window: none" in text.stdout and "rope theta:" in text.stdout


def test_list_create_and_rm(hub, tmp_path, tiny_v3):
    folder = pull(tmp_path, hub)
    env = env_for(tmp_path, hub.url, offline=True)
    mine = tmp_path / "mine"
    mistral_v3_folder(mine, seed=4)
    assert run_cli("create", "my-model", "-f", str(mine), env=env).returncode == 0
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert {"default", "my-model", REPO} <= set(rows)
    repo_row = rows[REPO]
    assert Path(repo_row["path"]) == folder and repo_row["revision"] == PINNED
    assert repo_row["format"] == "consolidated" and repo_row["parameters"] == n_params(tiny_v3)
    assert repo_row["size_bytes"] == sum(f.stat().st_size for f in tiny_v3.iterdir())
    assert rows["my-model"]["path"] == str(mine.resolve())
    assert rows["default"]["format"] == "gguf" and rows["default"]["quantization"] == "Q4_1"
    table = run_cli("list", env=env).stdout.splitlines()
    assert table[0].split()[:6] == ["NAME", "FORMAT", "QUANT", "SIZE", "PARAMS", "MODIFIED"]

    # -m NAME loads the registered folder.
    gen = run_cli("generate", "-m", "my-model", "Hi", "-n", "2", "-q", env=env)
    assert gen.returncode == 0, gen.stderr

    # rm: a registration is forgotten, its files stay; a pulled repository is deleted.
    assert run_cli("rm", "my-model", "-y", env=env).returncode == 0
    assert (mine / "consolidated.safetensors").is_file()
    assert "my-model" not in run_cli("list", env=env).stdout
    assert run_cli("rm", ALIAS, "-y", env=env).returncode == 0
    assert not folder.exists()
    assert_user_error(run_cli("generate", "-m", ALIAS, "Hi", env=env),
                      f"mistral7b pull {ALIAS}")


def test_rm_refuses_what_is_outside_the_store(hub, tmp_path, tiny_v3):
    folder = pull(tmp_path, hub)
    env = env_for(tmp_path, hub.url, offline=True)
    outside = tmp_path / "precious.gguf"
    outside.write_bytes(b"GGUF")
    assert_user_error(run_cli("rm", str(outside), "-y", env=env), "not in the model store",
                      "never deletes")
    assert outside.read_bytes() == b"GGUF"
    assert_user_error(run_cli("rm", "default", "-y", env=env), "pip uninstall")
    assert_user_error(run_cli("rm", "no-such-model", "-y", env=env), "no model")
    # Without -y and without a terminal to ask on, nothing is removed.
    assert_user_error(run_cli("rm", ALIAS, env=env), "-y")
    assert folder.is_dir()
    # A snapshot path inside the cache is in the store.
    assert run_cli("rm", str(folder), "-y", env=env).returncode == 0
    assert not folder.exists()


def test_missing_model_offline_is_one_line(tmp_path):
    env = env_for(tmp_path, dead_endpoint(), offline=True)
    for argv in (["generate", "-m", "mistral-7b-v0.1", "Hi"], ["run", "mistral-7b-v0.1", "Hi"],
                 ["show", "mistral-7b-v0.1"], ["serve", "-m", "mistral-7b-v0.1"]):
        assert_user_error(run_cli(*argv, env=env), "mistral-7b-v0.1", "not downloaded",
                          "mistral7b pull mistral-7b-v0.1")
    assert_user_error(run_cli("generate", "-m", str(tmp_path / "nope"), "Hi", env=env),
                      "no such file or folder", "mistral7b list")


def test_create_refuses_bad_names_and_files(tmp_path):
    env = env_for(tmp_path, dead_endpoint(), offline=True)
    assert_user_error(run_cli("create", "x", "-f", str(tmp_path / "nope"), env=env),
                      "no such file")
    junk = tmp_path / "notes.txt"
    junk.write_text("hello")
    assert_user_error(run_cli("create", "x", "-f", str(junk), env=env), "not a model")
    assert_user_error(run_cli("create", ALIAS, "-f", str(junk), env=env), "built-in name")
    assert_user_error(run_cli("create", "a/b", "-f", str(junk), env=env), "not a model name")


def test_run_pulls_then_answers(hub, tmp_path, tiny_v3):
    env = env_for(tmp_path, hub.url)
    result = run_cli("run", ALIAS, "Hello there", "-n", "5", "--json", "-q", env=env)
    assert result.returncode == 0, result.stderr
    assert "pulling" in result.stderr
    import mistral7b

    llm = mistral7b.load(tiny_v3)
    ids = llm.tokenizer.encode_chat([{"role": "user", "content": "Hello there"}])
    assert json.loads(result.stdout)["token_ids"] == llm.generate(ids, max_tokens=5).token_ids
    # Piped stdin and no prompt: the same answer, now from the store (nothing pulled again).
    before = len(hub.requests)
    piped = run_cli("run", ALIAS, "-n", "5", "--json", "-q", input="Hello there", env=env)
    assert piped.returncode == 0, piped.stderr
    assert json.loads(piped.stdout)["token_ids"] == json.loads(result.stdout)["token_ids"]
    assert len(hub.requests) == before


def test_run_opens_chat_on_a_terminal(tmp_path):
    env = cli_env(TERM="dumb", MISTRAL7B_HOME=str(tmp_path / "m7b"), HF_HUB_OFFLINE="1",
                  HF_HOME=str(tmp_path / "hf"))
    term = TerminalSession("run", "default", "-n", "8", env=env)
    try:
        term.expect_text(b">>> ", since=0)
        term.send(b"/bye\r")
        assert term.wait() == 0
    finally:
        term.close()


def test_rm_asks_on_a_terminal(tmp_path, tiny_v3):
    env = env_for(tmp_path, dead_endpoint(), offline=True)
    assert run_cli("create", "mine", "-f", str(tiny_v3), env=env).returncode == 0
    for answer, code, kept in ((b"n", 1, True), (b"y", 0, False)):
        term = TerminalSession("rm", "mine", env={**env, "TERM": "dumb"})
        try:
            term.expect_text(b"[y/N]", since=0)
            term.send(answer + b"\r")
            assert term.wait() == code, term.output
        finally:
            term.close()
        assert ("mine" in store_names(env)) == kept
    assert (tiny_v3 / "consolidated.safetensors").is_file()


def store_names(env: dict) -> set[str]:
    result = run_cli("list", "--json", env=env)
    assert result.returncode == 0, result.stderr
    return {row["name"] for row in json.loads(result.stdout)}
