"""The OpenAI-compatible HTTP server (the `server` extra): protocol (pydantic schemas),
serving (request -> scheduler -> response), routes, and the app factory.

`create_app` is imported on first use, so `mistral7b.server.settings` (plain dataclasses) works
without the extra installed: the CLI builds its parser from it.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServerSettings", "create_app"]


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from mistral7b.server.app import create_app

        return create_app
    if name == "ServerSettings":
        from mistral7b.server.settings import ServerSettings

        return ServerSettings
    raise AttributeError(f"module 'mistral7b.server' has no attribute {name!r}")
