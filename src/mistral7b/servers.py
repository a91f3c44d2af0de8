"""Running `mistral7b serve` processes, as the command line finds them (Ollama's workflow).

While a server runs it has one file, `$MISTRAL7B_HOME/servers/<pid>.json` (store.home()):

    {"url": "http://127.0.0.1:8000", "pid": 1234, "started": 1764444000.5,
     "model": "default", "path": "/.../SmolLM2-135M-Instruct.Q4_1.gguf",
     "quant_flag": "auto", "quant": "int4", "dtype_flag": null, "dtype": "float32",
     "device": "cpu", "speculate": 0, "lora": [], "adapters": [], "max_model_len": 8192,
     "trained_len": 8192,
     "served_model_name": "default", "api_key_required": false, "version": "0.1.0"}

`*_flag` are what the server's command line asked for (None: the default), `quant` / `dtype`
what it loaded ("none" for float weights). The key itself is never written. The file is
written atomically once the model is loaded and removed when the server stops; a server
killed outright leaves it behind, so readers check the pid and delete entries of dead ones.
Torch-free: the command-line client reads this before deciding whether to import torch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mistral7b import store
from mistral7b.atomic import write_text_atomically

SERVERS_DIR = "servers"


@dataclass(frozen=True)
class ServerEntry:
    url: str                          # base URL without /v1, e.g. http://127.0.0.1:8000
    pid: int
    started: float                    # POSIX time the server started
    model: str                        # -m as given
    path: str                         # the resolved file or folder
    quant_flag: str                   # --quant as given ("auto", "none", "int8", "int4")
    quant: str                        # what was loaded: "int4", "int8" or "none"
    dtype_flag: str | None            # --dtype as given (None: the default)
    dtype: str                        # what was loaded, e.g. "float32"
    device: str                       # "cpu", "cuda", "cuda:0"
    speculate: int = 0
    lora: list[str] = field(default_factory=list)       # applied to every request
    adapters: list[str] = field(default_factory=list)   # served by name (`model`)
    max_model_len: int = 0            # the server's context per sequence
    trained_len: int = 0              # the model's own context
    served_model_name: str = "default"
    api_key_required: bool = False
    version: str = ""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ServerEntry:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise TypeError("not an object")
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def servers_dir() -> Path:
    return store.home() / SERVERS_DIR


def entry_path(pid: int) -> Path:
    return servers_dir() / f"{pid}.json"


def register(entry: ServerEntry) -> Path:
    path = entry_path(entry.pid)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, entry.to_json())
    return path


def unregister(pid: int) -> None:
    try:
        entry_path(pid).unlink()
    except FileNotFoundError:
        pass


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:          # another user's live process
        return True
    return True


def running() -> list[ServerEntry]:
    """The registered servers whose process is alive, oldest first. Entries of dead
    processes, and files that are not entries, are deleted on the way."""
    folder = servers_dir()
    if not folder.is_dir():
        return []
    found = []
    for path in folder.glob("*.json"):
        try:
            entry = ServerEntry.from_json(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            continue                  # removed meanwhile by its server or another reader
        except (OSError, ValueError, TypeError):
            _remove(path)
            continue
        if path.stem != str(entry.pid) or not pid_alive(entry.pid):
            _remove(path)
            continue
        found.append(entry)
    return sorted(found, key=lambda e: e.started)


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


def uptime(entry: ServerEntry, now: float | None = None) -> str:
    """'3 s', '5 min', '2 h 10 min', '3 days'."""
    seconds = max(0, int((time.time() if now is None else now) - entry.started))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min"
    if seconds < 86400:
        return f"{seconds // 3600} h {seconds % 3600 // 60} min"
    return f"{seconds // 86400} days"


def describe(entry: ServerEntry) -> dict[str, Any]:
    """The entry as `mistral7b ps --json` prints it."""
    return {**dataclasses.asdict(entry), "uptime_s": round(time.time() - entry.started, 1)}
