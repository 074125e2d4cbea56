"""Routes POST /v1/completions: JSON, or server-sent events with `stream`."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from starlette.responses import JSONResponse, StreamingResponse

from services.serving.api.completions import handler
from services.serving.api.completions.schema import Completion, CompletionRequest
from services.serving.api.state import ServingState, serving

router = APIRouter()


@router.post("/v1/completions", response_model=None)
async def create_completion(request: CompletionRequest,
                            state: ServingState = Depends(serving)) -> JSONResponse | StreamingResponse:
    result = await handler.create(request, state)
    if isinstance(result, Completion):
        return JSONResponse(result.model_dump())
    # no-cache and no proxy buffering: each event must reach the client as it is written
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
