"""`mistral7b pull` against a local imitation of the Hugging Face Hub (no network)."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from cli_helpers import assert_user_error, run_cli
from fake_hub import FakeHub, hub_env

from mistral7b.cli.pull import ALIASES, select_files
from mistral7b.store import ALIASES as PINNED_ALIASES

PINNED = {name: revision for name, (_, revision) in PINNED_ALIASES.items()}

# The layout of mistralai/Mistral-7B-Instruct-v0.3: both weight formats, plus pickles/GGUF.
V03_FILES = {
    "consolidated.safetensors": b"C" * 64,
    "params.json": b'{"dim": 8}',
    "model-00001-of-00002.safetensors": b"A" * 100,
    "model-00002-of-00002.safetensors": b"B" * 50,
    "model.safetensors.index.json": b"{}",
    "config.json": b'{"model_type": "mistral"}',
    "generation_config.json": b"{}",
    "tokenizer.model": b"sp",
    "tokenizer.model.v3": b"sp3",
    "tokenizer.json": b"{}",
    "tokenizer_config.json": b"{}",
    "pytorch_model-00001-of-00002.bin": b"pickle",
    "mistral-7b-instruct-v0.3.Q4_0.gguf": b"GGUF",
    "README.md": b"# card",
    "original/consolidated.pth": b"pth",
}
V03_EXPECTED = {
    "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
    "model.safetensors.index.json", "config.json", "generation_config.json",
    "tokenizer.model", "tokenizer.model.v3", "tokenizer.json", "tokenizer_config.json",
}
# A repository with only mistral-inference's format.
CONSOLIDATED_FILES = {
    "consolidated.safetensors": b"W" * 80,
    "params.json": b'{"dim": 8}',
    "tokenizer.model": b"sp",
    "consolidated.00.pth": b"pickle",
}


@pytest.fixture
def hub():
    server = FakeHub()
    server.start()
    yield server
    server.stop()


def files_in(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and ".cache" not in p.relative_to(folder).parts}


def test_alias_downloads_hf_shards_and_configs_only(hub, tmp_path):
    hub.add(ALIASES["mistral-7b-instruct-v0.3"], V03_FILES,
            sha=PINNED["mistral-7b-instruct-v0.3"])
    out = tmp_path / "model"
    result = run_cli("pull", "mistral-7b-instruct-v0.3", "--dir", str(out),
                     env=hub_env(hub.url, tmp_path / "hf"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(out.resolve())       # stdout: only the path
    assert files_in(out) == V03_EXPECTED
    for name in V03_EXPECTED:
        assert (out / name).read_bytes() == V03_FILES[name]
    # The pickles, the GGUF and the duplicate consolidated weights are never even asked for.
    assert hub.touched() == V03_EXPECTED


def test_consolidated_repo_into_the_cache(hub, tmp_path):
    repo = hub.add(ALIASES["mistral-7b-v0.1"], CONSOLIDATED_FILES,
                   sha=PINNED["mistral-7b-v0.1"])
    home = tmp_path / "hf"
    result = run_cli("pull", "mistral-7b-v0.1", env=hub_env(hub.url, home))
    assert result.returncode == 0, result.stderr
    folder = Path(result.stdout.strip())
    assert folder == (home / "hub" / "models--mistralai--Mistral-7B-v0.1" / "snapshots" /
                      repo.sha).resolve()
    assert files_in(folder) == {"consolidated.safetensors", "params.json", "tokenizer.model"}
    assert (folder / "consolidated.safetensors").read_bytes() == b"W" * 80


@pytest.mark.parametrize("gated, api_status", [(True, 200), (False, 403)],
                         ids=["download-401-gated", "api-403"])
def test_gated_repository(hub, tmp_path, gated, api_status):
    repo_id = ALIASES["mistral-7b-instruct-v0.2"]
    hub.add(repo_id, {"model.safetensors": b"x", "config.json": b"{}"}, gated=gated,
            api_status=api_status)
    result = run_cli("pull", repo_id, "--dir", str(tmp_path / "m"),
                     env=hub_env(hub.url, tmp_path / "hf"))
    assert_user_error(result, f"{repo_id} is gated", f"https://huggingface.co/{repo_id}",
                      "--token", "HF_TOKEN")


def test_missing_repository(hub, tmp_path):
    result = run_cli("pull", "nobody/no-such-model", env=hub_env(hub.url, tmp_path / "hf"))
    assert_user_error(result, "no such repository nobody/no-such-model", hub.url)


def test_hub_unreachable(tmp_path):
    with socket.socket() as s:      # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        endpoint = f"http://127.0.0.1:{s.getsockname()[1]}"
    result = run_cli("pull", "mistral", env=hub_env(endpoint, tmp_path / "hf"))
    assert_user_error(result, f"cannot reach the Hugging Face Hub at {endpoint}",
                      "HF_ENDPOINT")


def test_repository_without_safetensors(hub, tmp_path):
    hub.add("someone/pickles-only", {"pytorch_model.bin": b"p", "config.json": b"{}",
                                     "model.Q8_0.gguf": b"g"})
    result = run_cli("pull", "someone/pickles-only", env=hub_env(hub.url, tmp_path / "hf"))
    assert_user_error(result, "no .safetensors", ".bin", "--include")
    assert not hub.downloaded()


def test_select_files_rules():
    assert set(select_files(list(V03_FILES), [])) == V03_EXPECTED
    assert set(select_files(list(CONSOLIDATED_FILES), [])) == {
        "consolidated.safetensors", "params.json", "tokenizer.model"}
    # --include adds files by pattern, subfolders too.
    assert set(select_files(list(V03_FILES), ["*.gguf", "original/*"])) == V03_EXPECTED | {
        "mistral-7b-instruct-v0.3.Q4_0.gguf", "original/consolidated.pth"}


def test_aliases_name_mistral_repositories():
    assert ALIASES["mistral-7b-v0.1"] == "mistralai/Mistral-7B-v0.1"
    assert ALIASES["mistral-7b-instruct-v0.1"] == "mistralai/Mistral-7B-Instruct-v0.1"
    assert ALIASES["mistral-7b-instruct-v0.2"] == "mistralai/Mistral-7B-Instruct-v0.2"
    assert ALIASES["mistral-7b-v0.3"] == "mistralai/Mistral-7B-v0.3"
    assert ALIASES["mistral-7b-instruct-v0.3"] == "mistralai/Mistral-7B-Instruct-v0.3"


def test_aliases_are_pinned_to_commits(hub, tmp_path):
    """An alias downloads its pinned commit: a Hub whose `main` moved on is not followed."""
    hub.add(ALIASES["mistral-7b-v0.3"], CONSOLIDATED_FILES, sha="f" * 40)   # main is elsewhere
    result = run_cli("pull", "mistral-7b-v0.3", env=hub_env(hub.url, tmp_path / "hf"))
    assert_user_error(result, "has no revision", PINNED["mistral-7b-v0.3"])
    for name, revision in PINNED.items():
        assert len(revision) == 40 and int(revision, 16) >= 0, name
