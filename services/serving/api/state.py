"""What every HTTP handler shares: the engine, the adapter registry, the base
model's name, admission control, and whether the server is draining."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass, field

from fastapi import Request

from services.serving.adapters import AdapterRegistry
from services.serving.admission import Admission
from services.serving.engine import Engine


@dataclass
class ServingState:
    engine: Engine
    registry: AdapterRegistry
    base_name: str
    model_dir: pathlib.Path
    admission: Admission = field(default_factory=lambda: Admission(256))
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    # --tool_call_parser / --enable_auto_tool_choice: which tool_choice values a request may use.
    tool_call_parser: str | None = None
    enable_auto_tool_choice: bool = False


def serving(request: Request) -> ServingState:
    """FastAPI dependency: the state `build_app` attached to the app."""
    return request.app.state.serving
