"""Routes POST /v1/chat/completions: JSON, or server-sent events with `stream`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, StreamingResponse

from services.serving.api import generation
from services.serving.api.body import JsonRoute
from services.serving.api.chat_completions import handler
from services.serving.api.chat_completions.schema import ChatCompletionRequest
from services.serving.api.state import ServingState, serving

router = APIRouter(route_class=JsonRoute)


@router.post("/v1/chat/completions", response_model=None)
async def create_chat_completion(request: ChatCompletionRequest,
                                 state: ServingState = Depends(serving)) -> JSONResponse | StreamingResponse:
    return generation.response(await handler.create(request, state))
