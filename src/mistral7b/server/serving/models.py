"""/v1/models: what this server serves, and the check every endpoint makes of `model`."""

from __future__ import annotations

import time

from mistral7b.server.errors import APIError
from mistral7b.server.protocol import ModelCard, ModelList
from mistral7b.server.settings import ServerSettings


class ServingModels:
    def __init__(self, settings: ServerSettings, max_model_len: int) -> None:
        self.settings = settings
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def list(self) -> ModelList:
        return ModelList(data=[self.card(self.settings.model_name)])

    def card(self, name: str) -> ModelCard:
        self.check(name)
        return ModelCard(id=name, created=self.created, max_model_len=self.max_model_len)

    def check(self, name: str | None) -> None:
        """404 unless `name` is None (the default) or a model this server serves."""
        if name is not None and name != self.settings.model_name:
            raise APIError(404, f"The model `{name}` does not exist; this server serves "
                                f"`{self.settings.model_name}`",
                           param="model", code="model_not_found")
