"""A small client of our OpenAI-compatible server on the standard library (http.client):
what `mistral7b generate` / `chat` use to answer through a running `mistral7b serve`.

Torch-free and quick to import, so a command answered by a server costs Python's start-up,
one HTTP request and the server's pre-fill. Streams are read event by event and yielded as
they come. Failures are one-line errors a user can act on:

- the server cannot be reached: ServerUnreachable (says how to start one);
- it answers 4xx/5xx: ServerError with the server's own message (the same words the local
  path gives for the same mistake: both come from the same checks);
- the connection drops, or an error event arrives, mid-stream: ServerGone.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

from mistral7b.errors import InputError, Mistral7BError

HEALTH_TIMEOUT_S = 0.5       # a live server answers /health in milliseconds
READ_TIMEOUT_S = 600.0       # the longest silence in a stream (keep-alive comments reset it)


class ServerUnreachable(Mistral7BError):
    """Nothing answers at the server's address."""


class ServerError(InputError):
    """The server refused the request (4xx) or failed it (5xx); `status` is the HTTP code."""

    def __init__(self, message: str, *, status: int, param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, param=param)
        self.status = status
        self.code = code


class ServerGone(Mistral7BError):
    """The server stopped (or failed the request) in the middle of an answer."""


class APIClient:
    def __init__(self, url: str, api_key: str | None = None,
                 timeout: float = READ_TIMEOUT_S) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputError(f"--host {url!r} is not a server address: give e.g. "
                             "http://127.0.0.1:8000")
        self.url = f"{parts.scheme}://{parts.netloc}"
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.api_key = api_key
        self.timeout = timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self.scheme == "https" else http.client.HTTPConnection
        return cls(self.host, self.port, timeout=timeout)

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def healthy(self, timeout: float = HEALTH_TIMEOUT_S) -> bool:
        """True when /health answers 200 within `timeout` seconds (loaded and not draining)."""
        conn = self._connection(timeout)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except (OSError, http.client.HTTPException):
            return False
        finally:
            conn.close()

    def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` as JSON; the JSON answer."""
        conn, response = self._send(path, body)
        try:
            data = json.loads(response.read())
        except (OSError, http.client.HTTPException, ValueError) as exc:
            raise ServerGone(f"the server at {self.url} stopped before answering ({exc})") \
                from None
        finally:
            conn.close()
        if not isinstance(data, dict):
            raise ServerGone(f"the server at {self.url} answered something that is not a "
                             "JSON object")
        return data

    def stream(self, path: str, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        """POST `body` with stream=true; yield each event's JSON until [DONE]. Closing the
        generator (Ctrl-C, or the caller stops reading) closes the connection, and the
        server then drops the request within one step."""
        conn, response = self._send(path, {**body, "stream": True})
        try:
            yield from self._events(response)
        finally:
            conn.close()

    def _send(self, path: str, body: dict[str, Any]
              ) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
        conn = self._connection(self.timeout)
        try:
            conn.request("POST", path, body=json.dumps(body).encode(), headers=self._headers())
            response = conn.getresponse()
        except OSError as exc:          # refused, no such host, timed out
            conn.close()
            raise ServerUnreachable(f"no mistral7b server answers at {self.url} "
                                    f"({_reason(exc)})") from None
        except http.client.HTTPException as exc:
            conn.close()
            raise ServerGone(f"the server at {self.url} closed the connection before "
                             f"answering ({type(exc).__name__})") from None
        if response.status >= 400:
            try:
                raise _error(response.status, response.read(), self.url)
            finally:
                conn.close()
        return conn, response

    def _events(self, response: http.client.HTTPResponse) -> Iterator[dict[str, Any]]:
        data: list[str] = []
        while True:
            try:
                raw = response.readline()
            except (OSError, http.client.HTTPException) as exc:
                raise ServerGone(f"the connection to the server at {self.url} broke in the "
                                 f"middle of the answer ({_reason(exc)})") from None
            if not raw:
                raise ServerGone(f"the server at {self.url} stopped in the middle of the "
                                 "answer (the connection closed before the end)")
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip(" "))
                continue
            if line or not data:       # a comment (": keep-alive"), a field we do not use
                continue
            text, data = "\n".join(data), []
            if text == "[DONE]":
                return
            event = json.loads(text)
            if "error" in event:
                error = event["error"] or {}
                raise ServerGone(f"the server failed the request: "
                                 f"{error.get('message', 'unknown error')}")
            yield event


def _error(status: int, body: bytes, url: str) -> Mistral7BError:
    try:
        error = json.loads(body)["error"]
        message, param, code = str(error["message"]), error.get("param"), error.get("code")
    except (ValueError, KeyError, TypeError):
        message, param, code = body.decode("utf-8", "replace").strip()[:200], None, None
    if status == 401:
        return ServerError(f"the server at {url} needs an API key: give --api-key KEY or set "
                           "MISTRAL7B_API_KEY", status=status)
    if status >= 500:
        return ServerError(f"the server at {url} could not answer: {message}", status=status)
    return ServerError(message, status=status, param=param, code=code)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return str(exc) or type(exc).__name__
