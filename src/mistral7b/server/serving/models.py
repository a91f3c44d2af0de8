"""/v1/models: what this server serves (the base model and its LoRA adapters), and the check
every endpoint makes of `model`, which picks the adapter a request runs with."""

from __future__ import annotations

import time
from collections.abc import Mapping

from mistral7b.server.errors import APIError
from mistral7b.server.protocol import ModelCard, ModelList
from mistral7b.server.settings import ServerSettings


class ServingModels:
    def __init__(self, settings: ServerSettings, max_model_len: int,
                 adapters: Mapping[str, int] | None = None) -> None:
        self.settings = settings
        self.max_model_len = max_model_len
        self.adapters = dict(adapters or {})       # served adapter name -> engine slot
        self.created = int(time.time())

    def list(self) -> ModelList:
        names = [self.settings.model_name, *self.adapters]
        return ModelList(data=[self.card(name) for name in names])

    def card(self, name: str) -> ModelCard:
        self.check(name)
        parent = self.settings.model_name if name in self.adapters else None
        return ModelCard(id=name, created=self.created, max_model_len=self.max_model_len,
                         parent=parent)

    def check(self, name: str | None) -> int:
        """The adapter slot `name` runs with (0: the base model, also for None); 404 unless
        it is a model this server serves."""
        if name is None or name == self.settings.model_name:
            return 0
        if name in self.adapters:
            return self.adapters[name]
        served = ", ".join(f"`{n}`" for n in [self.settings.model_name, *self.adapters])
        raise APIError(404, f"The model `{name}` does not exist; this server serves {served}",
                       param="model", code="model_not_found")
