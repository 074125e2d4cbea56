"""What /v1/models answers: the base model first, then every adapter requests can use."""

from __future__ import annotations

from libs.common.errors import NotFound
from services.serving.api.models.schema import ModelCard, ModelList
from services.serving.api.state import ServingState


def list_models(state: ServingState) -> ModelList:
    base = ModelCard(id=state.base_name, created=state.created, root=str(state.model_dir),
                     max_model_len=state.engine.max_model_len)
    adapters = [
        ModelCard(id=view.name, created=int(view.loaded_at) or state.created, root=view.path,
                  parent=state.base_name, max_model_len=state.engine.max_model_len)
        for view in state.registry.servable()
    ]
    return ModelList(data=[base, *adapters])


def get_model(state: ServingState, model: str) -> ModelCard:
    for card in list_models(state).data:
        if card.id == model:
            return card
    raise NotFound(f"The model `{model}` does not exist.", field="model")
