"""What every HTTP handler shares: the engine, the adapter registry, the base
model's name, admission control, and whether the server is draining."""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fastapi import Request

from services.serving.adapters import AdapterRegistry
from services.serving.admission import Admission
from services.serving.engine import Engine

if TYPE_CHECKING:
    from services.serving.api.chat_completions.tools import ToolCalling


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
    # vLLM's parser for that flag: constrains and parses tool calls (chat_completions/tools.py).
    tool_calling: "ToolCalling | None" = None


def serving(request: Request) -> ServingState:
    """FastAPI dependency: the state `build_app` attached to the app."""
    return request.app.state.serving
