"""OpenAI's model list shape (with vLLM's `root`, `parent` and `max_model_len`)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tuneforge"
    # The directory the weights come from: the base model, or the adapter checkpoint.
    root: str
    # An adapter's base model name; null for the base model.
    parent: str | None = None
    max_model_len: int | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
