"""`mistral7b pull REPO_OR_ALIAS`: download a checkpoint from the Hugging Face Hub.

Only what mistral7b loads is downloaded: safetensors weights, the JSON configs and tokenizer
files (`tokenizer.model*`, `tekken.json`, `tokenizer.json`, ...) and `chat_template.jinja`,
from the repository's top folder. The PyTorch pickles (`*.bin`, `*.pth`, `*.pt`) and GGUF
files that many repositories hold beside them are skipped (`--include` adds files by name).

Mistral's repositories for v0.3 hold the weights twice: `consolidated.safetensors` +
`params.json` (mistral-inference's format) and HF shards `model-*.safetensors` +
`config.json`. Then the HF shards are taken and `consolidated*.safetensors` / `params.json`
left out: the shards download in parallel and resume file by file, their config states
rope_theta explicitly (v0.1's params.json omits it), and other tools read the same folder.
Both hold the same tensors, so nothing is lost.

An alias downloads the commit it is pinned to (store.ALIASES), so it means the same files
everywhere; `--revision` overrides. What `pull` downloads into the cache is in the model store:
`-m ALIAS` or `-m owner/name` then loads it offline (`mistral7b list` shows it).
The local folder's path is printed on stdout (`mistral7b generate -m "$(mistral7b pull ...)"`);
progress bars go to stderr. The Hub endpoint comes from HF_ENDPOINT, the token from --token
or HF_TOKEN, the cache folder from HF_HOME / HF_HUB_CACHE unless --dir is given.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mistral7b import store
from mistral7b.cli import common
from mistral7b.errors import InputError, Mistral7BError

# Alias -> Hub repository; the commit each alias is pinned to is in store.ALIASES.
ALIASES = {name: repo for name, (repo, _) in store.ALIASES.items()}
_CONFIG_FILES = ("*.json", "tokenizer.model*", "chat_template.jinja")


class PullError(Mistral7BError):
    """The Hub could not give us the checkpoint; the message says what to do."""


def add_parser(subparsers: Any) -> None:
    aliases = ", ".join(ALIASES)
    p = subparsers.add_parser(
        "pull", help="download a checkpoint from the Hugging Face Hub",
        description="Download the safetensors weights, configs and tokenizer of a Hub "
                    "repository (no .bin/.pth/.gguf duplicates) and print the local folder. "
                    f"Aliases: {aliases}.")
    p.add_argument("repo", metavar="REPO_OR_ALIAS",
                   help="a Hub repository 'owner/name' or an alias")
    p.add_argument("--dir", metavar="DIR",
                   help="download into DIR (default: the Hugging Face cache, HF_HOME)")
    p.add_argument("--revision", metavar="REV",
                   help="branch, tag or commit (default: an alias's pinned commit, else main)")
    p.add_argument("--token", metavar="TOKEN",
                   help="Hugging Face access token, for gated or private repositories "
                        "(default: HF_TOKEN or the saved login)")
    p.add_argument("--include", action="append", default=[], metavar="PATTERN",
                   help="also download the files matching PATTERN (repeatable), e.g. "
                        "'*Q4_0.gguf' from a GGUF repository")
    p.set_defaults(run=run)


def resolve_repo(name: str, revision: str | None = None) -> tuple[str, str]:
    """(repository, revision) to download for an alias or 'owner/name[@rev]'; an explicit
    `revision` wins over an alias's pinned commit."""
    try:
        repo, pinned = store.repo_and_revision(name)
    except InputError as exc:
        raise PullError(str(exc)) from None
    return repo, revision or pinned or "main"


def select_files(names: list[str], include: list[str]) -> list[str]:
    """The repository files to download (see the module docstring for the rules)."""
    top = [n for n in names if "/" not in n]
    tensors = [n for n in top if n.endswith(".safetensors")]
    hf_shards = [n for n in tensors if not n.startswith("consolidated")]
    if hf_shards and "config.json" in top:
        weights, skip = hf_shards, {"params.json"}
    else:
        weights, skip = tensors, set()
    configs = [n for n in top if n not in skip
               and any(fnmatch.fnmatchcase(n, p) for p in _CONFIG_FILES)]
    extra = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in include)]
    return sorted(set(weights + configs + extra))


def run(args: argparse.Namespace) -> int:
    print(download(args.repo, args.revision, local_dir=args.dir, token=args.token or None,
                   include=args.include))
    return 0


def download(name: str, revision: str | None = None, *, local_dir: str | None = None,
             token: str | None = None, include: list[str] | None = None) -> Path:
    """Download what mistral7b loads of an alias or repository; the local path to load."""
    from huggingface_hub import HfApi, constants, snapshot_download

    repo, revision = resolve_repo(name, revision)
    try:
        info = HfApi(token=token).model_info(repo, revision=revision, files_metadata=True)
        siblings = {s.rfilename: s.size for s in info.siblings or []}
        files = select_files(list(siblings), include or [])
        weights = [f for f in files if f.endswith((".safetensors", ".gguf"))]
        if not weights:
            raise PullError(_no_weights_message(repo, list(siblings)))
        sizes = [siblings[f] for f in files]
        known = [s for s in sizes if s is not None]
        size = f", {_size(sum(known))}" if len(known) == len(sizes) else ""
        common.log(f"pulling {repo} ({revision}): {len(files)} files{size}")
        folder = snapshot_download(
            repo, revision=revision, local_dir=local_dir, token=token,
            allow_patterns=[_literal(f) for f in files])
    except PullError:
        raise
    except Exception as exc:
        message = hub_error_message(exc, repo, revision, constants.ENDPOINT)
        if message is None:
            raise
        raise PullError(message) from exc
    path = Path(folder)
    ggufs = [f for f in weights if f.endswith(".gguf")]
    if len(ggufs) == 1 and len(weights) == 1:
        path = path / ggufs[0]       # what -m wants for a GGUF checkpoint is the file
    return path


def hub_error_message(exc: BaseException, repo: str, revision: str,
                      endpoint: str) -> str | None:
    """One actionable line for an error of huggingface_hub, or None when it is not one."""
    from huggingface_hub import errors

    network = _network_errors()
    for e in _causes(exc):
        if isinstance(e, errors.OfflineModeIsEnabled):
            return "HF_HUB_OFFLINE is set: unset it to download"
        if isinstance(e, errors.GatedRepoError):
            return _gated(repo)
        if isinstance(e, errors.RevisionNotFoundError):
            return f"{repo} has no revision {revision!r}"
        if isinstance(e, errors.RepositoryNotFoundError):
            return (f"no such repository {repo} on {endpoint} (if it is private, pass --token "
                    "or set HF_TOKEN)")
        if isinstance(e, errors.HfHubHTTPError) and e.response is not None:
            status = e.response.status_code
            if status in (401, 403):
                return _gated(repo)
            if status == 404:
                return f"no such repository {repo} on {endpoint}"
            return f"the Hub at {endpoint} answered HTTP {status} for {repo}: try again later"
        if isinstance(e, errors.FileMetadataError):
            return f"{endpoint} does not answer like a Hugging Face Hub: check HF_ENDPOINT"
        if isinstance(e, network):
            return f"cannot reach the Hugging Face Hub at {endpoint}: check your network or " \
                   "HF_ENDPOINT"
    return None


def _gated(repo: str) -> str:
    return (f"{repo} is gated: accept its license at https://huggingface.co/{repo} and pass "
            "--token or set HF_TOKEN")


def _no_weights_message(repo: str, names: list[str]) -> str:
    other = sorted({Path(n).suffix for n in names
                    if n.endswith((".bin", ".pth", ".pt", ".gguf", ".ckpt"))})
    has = f" (it has {', '.join(other)} files)" if other else ""
    hint = "; for a GGUF file pass --include 'NAME.gguf'" if ".gguf" in other else ""
    return f"{repo} has no .safetensors weights{has}: mistral7b pulls safetensors{hint}"


def _causes(exc: BaseException) -> Iterator[BaseException]:
    """exc, then what caused it, and so on (huggingface_hub wraps connection errors)."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _network_errors() -> tuple[type[BaseException], ...]:
    """Connection/timeout errors of whichever HTTP library huggingface_hub uses."""
    found: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, names in (("httpx2", ("TransportError",)), ("httpx", ("TransportError",)),
                          ("requests", ("ConnectionError", "Timeout"))):
        if module in sys.modules:
            found += [getattr(sys.modules[module], n) for n in names
                      if hasattr(sys.modules[module], n)]
    return tuple(found)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _literal(name: str) -> str:
    """An fnmatch pattern matching exactly `name`."""
    return re.sub(r"([*?\[])", r"[\1]", name)
