"""The OpenAPI document at /openapi.json: FastAPI's, plus what FastAPI cannot derive from the
routes: the server-sent events of a streamed completion (OpenAPI 3.1: the schema of one event,
whose `data` is a JSON chunk, OpenAI's error body, or `[DONE]`) and, with --api_key, the bearer
scheme guarding /v1. Clients and the HTTP fuzzer read it; it must say what the server does."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

REF = "#/components/schemas/{model}"


def event_stream(chunk: str) -> dict[str, Any]:
    """One server-sent event of a stream whose chunks are the component `chunk`."""
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": {"anyOf": [
            {"$ref": REF.format(model=chunk)}, {"$ref": REF.format(model="ErrorResponse")}]}},
    ]}}}


def install(app: FastAPI, streams: dict[str, type[BaseModel]], bearer_prefix: str | None) -> None:
    """`streams`: path -> the model of its stream's chunks. `bearer_prefix`: paths under it
    require `Authorization: Bearer` (None: no API key)."""
    generate = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = generate()
            components = schema.setdefault("components", {})
            _, definitions = models_json_schema([(model, "serialization") for model in streams.values()],
                                                ref_template=REF)
            for name, definition in definitions.get("$defs", {}).items():
                components.setdefault("schemas", {}).setdefault(name, definition)
            for path, model in streams.items():
                content = schema["paths"][path]["post"]["responses"]["200"]["content"]
                content["text/event-stream"] = {"schema": event_stream(model.__name__)}
            if bearer_prefix is not None:
                components["securitySchemes"] = {"api_key": {"type": "http", "scheme": "bearer"}}
                for path, operations in schema["paths"].items():
                    if path.startswith(bearer_prefix):
                        for operation in operations.values():
                            operation["security"] = [{"api_key": []}]
        return app.openapi_schema

    app.openapi = openapi
