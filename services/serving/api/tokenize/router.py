"""Routes POST /tokenize and POST /detokenize (vLLM's paths: outside /v1, as `vllm serve` has them)."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from services.serving.api.body import JsonRoute
from services.serving.api.errors import ERROR_RESPONSES
from services.serving.api.state import ServingState, serving
from services.serving.api.tokenize import handler
from services.serving.api.tokenize.schema import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)

router = APIRouter(route_class=JsonRoute)


@router.post("/tokenize", response_model=TokenizeResponse, responses=ERROR_RESPONSES)
async def tokenize(request: TokenizeRequest, state: ServingState = Depends(serving)) -> TokenizeResponse:
    return await handler.tokenize(request, state)


@router.post("/detokenize", response_model=DetokenizeResponse, responses=ERROR_RESPONSES)
async def detokenize(request: DetokenizeRequest, state: ServingState = Depends(serving)) -> DetokenizeResponse:
    return await handler.detokenize(request, state)
