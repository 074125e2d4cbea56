"""Routes GET /version: the vLLM version serving the model, as `vllm serve` answers it."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

router = APIRouter()


class VersionResponse(BaseModel):
    version: str


@router.get("/version", response_model=VersionResponse)
async def version() -> VersionResponse:
    from vllm.version import __version__  # the engine has imported vLLM already

    return VersionResponse(version=__version__)
