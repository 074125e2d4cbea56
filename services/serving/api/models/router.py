"""Routes GET /v1/models and GET /v1/models/{model}."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.serving.api.errors import ERROR_RESPONSES
from services.serving.api.models import handler
from services.serving.api.models.schema import ModelCard, ModelList
from services.serving.api.state import ServingState, serving

router = APIRouter()


@router.get("/v1/models", response_model=ModelList, responses=ERROR_RESPONSES)
async def list_models(state: ServingState = Depends(serving)) -> ModelList:
    return handler.list_models(state)


# Adapter names may contain "/" (like hub ids), hence the path converter.
@router.get("/v1/models/{model:path}", response_model=ModelCard, responses=ERROR_RESPONSES)
async def get_model(model: str, state: ServingState = Depends(serving)) -> ModelCard:
    return handler.get_model(state, model)
