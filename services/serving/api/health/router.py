"""GET /health for load balancers and orchestrators (no API key needed)."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Depends
from pydantic import BaseModel
from starlette.responses import JSONResponse

from libs.common.errors import TuneForgeError, Unavailable
from services.serving.api.errors import ErrorResponse, body_of, status_of
from services.serving.api.state import ServingState, serving

router = APIRouter()


class Healthy(BaseModel):
    status: Literal["ok"]


@router.get("/health", response_model=Healthy, responses={
    503: {"model": ErrorResponse, "description": "Draining, or the inference engine has stopped"}})
async def health(state: ServingState = Depends(serving)) -> JSONResponse:
    try:
        if state.draining:
            raise Unavailable("draining: the server is shutting down")
        await state.engine.check_health()
    except TuneForgeError as exc:
        return JSONResponse(body_of(exc), status_code=status_of(exc))
    return JSONResponse({"status": "ok"})
