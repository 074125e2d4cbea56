"""Routes POST /v1/chat/completions: JSON, or server-sent events with `stream`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, StreamingResponse

from services.serving.api import generation
from services.serving.api.body import JsonRoute
from services.serving.api.chat_completions import handler
from services.serving.api.chat_completions.schema import ChatCompletion, ChatCompletionRequest
from services.serving.api.errors import ERROR_RESPONSES
from services.serving.api.state import ServingState, serving

router = APIRouter(route_class=JsonRoute)
# 200 is OpenAI's chat completion, or with `stream` its chunks as server-sent events ending in
# `data: [DONE]` (their schema: api/openapi.py).
RESPONSES = {200: {"model": ChatCompletion,
                   "description": "The chat completion (JSON), or its stream (`stream: true`)"},
             **ERROR_RESPONSES}


@router.post("/v1/chat/completions", response_model=None, responses=RESPONSES)
async def create_chat_completion(request: ChatCompletionRequest,
                                 state: ServingState = Depends(serving)) -> JSONResponse | StreamingResponse:
    return generation.response(await handler.create(request, state))
