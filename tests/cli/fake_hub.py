"""A local HTTP server that answers the requests huggingface_hub's `snapshot_download` makes.

What huggingface_hub 2.4 asks (read from its source: hf_api.model_info / list_repo_tree,
file_download.get_hf_file_metadata / http_get):

- GET  /api/models/{repo}/revision/{rev}     -> {"id", "sha", "siblings": [{"rfilename", "size"}]}
- GET  /api/models/{repo}/tree/{rev}?recursive=True -> [{"type": "file", "path", "size", "oid"}]
  (one page: no `Link: rel="next"` header)
- HEAD /{repo}/resolve/{rev}/{path}          -> ETag, X-Repo-Commit, Content-Length
- GET  /{repo}/resolve/{rev}/{path}          -> the bytes, same headers

Errors carry the Hub's `X-Error-Code` header (RepoNotFound, RevisionNotFound, GatedRepo),
which huggingface_hub turns into its exception classes. As on huggingface.co, a gated
repository's metadata is public and its file downloads answer 401.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cli_helpers import cli_env


def hub_env(endpoint: str, home: Path) -> dict[str, str]:
    """The CLI's environment with the Hub at `endpoint` and the HF cache under `home`."""
    env = cli_env(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
                  NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    for name in ("HF_HUB_OFFLINE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_CACHE",
                 "HUGGINGFACE_HUB_CACHE", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY",
                 "http_proxy", "https_proxy", "all_proxy"):
        env.pop(name, None)
    return env


@dataclass
class FakeRepo:
    files: dict[str, bytes]
    gated: bool = False          # file downloads answer 401 GatedRepo
    api_status: int = 200        # e.g. 403: the metadata request itself is refused
    sha: str = field(default="")

    def etag(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[tuple[str, str]] = []       # (method, path)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self.server.daemon_threads = True
        self.server.hub = self
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo_id: str, files: dict[str, bytes], **kwargs) -> FakeRepo:
        repo = FakeRepo(files, **kwargs)
        repo.sha = repo.sha or hashlib.sha1(repo_id.encode()).hexdigest()
        self.repos[repo_id] = repo
        return repo

    def downloaded(self) -> set[str]:
        """Files whose bytes were asked for (GET on /resolve/)."""
        return {path.split("/resolve/", 1)[1].split("/", 1)[1]
                for method, path in self.requests if method == "GET" and "/resolve/" in path}

    def touched(self) -> set[str]:
        """Files asked about at all (HEAD or GET on /resolve/)."""
        return {path.split("/resolve/", 1)[1].split("/", 1)[1]
                for _, path in self.requests if "/resolve/" in path}

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:  # quiet test output
        pass

    def do_GET(self) -> None:
        self._answer(send_body=True)

    def do_HEAD(self) -> None:
        self._answer(send_body=False)

    def _answer(self, send_body: bool) -> None:
        hub: FakeHub = self.server.hub
        path = unquote(urlsplit(self.path).path)
        hub.requests.append((self.command, path))

        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path):
            repo = self._repo(m[1], m[3])
            if repo is None:
                return
            if repo.api_status != 200:
                return self._error(repo.api_status, None, "Forbidden")
            if m[2] == "revision":
                body = {"id": m[1], "sha": repo.sha, "private": False,
                        "gated": "auto" if repo.gated else False,
                        "siblings": [{"rfilename": n, "size": len(b)}
                                     for n, b in repo.files.items()]}
            else:
                body = [{"type": "file", "path": n, "size": len(b),
                         "oid": hashlib.sha1(b).hexdigest()} for n, b in repo.files.items()]
            return self._send(200, json.dumps(body).encode(), {"Content-Type": "application/json"},
                              send_body)

        if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
            repo = self._repo(m[1], m[2])
            if repo is None:
                return
            if repo.gated:
                return self._error(401, "GatedRepo", "Access to this model is restricted")
            name = m[3]
            if name not in repo.files:
                return self._error(404, "EntryNotFound", "Entry not found")
            data = repo.files[name]
            headers = {"ETag": f'"{repo.etag(name)}"', "X-Repo-Commit": repo.sha,
                       "Content-Type": "application/octet-stream"}
            return self._send(200, data, headers, send_body)

        self._error(404, None, "Not found")

    def _repo(self, repo_id: str, revision: str) -> FakeRepo | None:
        repo = self.server.hub.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
        elif revision not in ("main", repo.sha):
            self._error(404, "RevisionNotFound", "Invalid rev id")
            return None
        return repo

    def _error(self, status: int, code: str | None, message: str) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, json.dumps({"error": message}).encode(), headers, True)

    def _send(self, status: int, body: bytes, headers: dict[str, str], send_body: bool) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if send_body and self.command != "HEAD":
            self.wfile.write(body)
