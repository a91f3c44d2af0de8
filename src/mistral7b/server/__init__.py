"""The OpenAI-compatible HTTP server (the `server` extra): protocol (pydantic schemas),
serving (request -> scheduler -> response), routes, and the app factory."""

from mistral7b.server.app import create_app
from mistral7b.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app"]
