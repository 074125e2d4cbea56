"""Routes POST /v1/completions: JSON, or server-sent events with `stream`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, StreamingResponse

from services.serving.api import generation
from services.serving.api.body import JsonRoute
from services.serving.api.completions import handler
from services.serving.api.completions.schema import CompletionRequest
from services.serving.api.state import ServingState, serving

router = APIRouter(route_class=JsonRoute)


@router.post("/v1/completions", response_model=None)
async def create_completion(request: CompletionRequest,
                            state: ServingState = Depends(serving)) -> JSONResponse | StreamingResponse:
    return generation.response(await handler.create(request, state))
