"""Answers a chat completion: render the messages with the model's chat template,
run the engine on the base model or an adapter for `n` choices, and shape the
result as OpenAI's completion, or as its chunk stream (each choice's role first,
text deltas, finish reasons, optional usage, then `[DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from services.serving.api import generation
from services.serving.api.chat_completions.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    Usage,
)
from services.serving.api.state import ServingState

async def create(request: ChatCompletionRequest, state: ServingState) -> ChatCompletion | AsyncIterator[str]:
    """A whole completion, or (stream) an iterator of server-sent events. Errors
    before the first token raise (the HTTP status tells them); later ones end the
    stream with an error event."""
    job = generation.start(state, request, time.perf_counter())
    with generation.closed_on_failure(job):
        prompt = await state.engine.chat_prompt([m.for_template() for m in request.messages])
        max_tokens = state.engine.completion_budget(len(prompt), request.completion_limit())
        params = generation.sampling_params(request, max_tokens)
        job.tally.prompt_tokens = len(prompt)
        if request.stream:
            deltas = await generation.open_stream(job, [prompt], params, request.n)
            return _events(request, job, deltas)
        choices = await generation.complete(job, [prompt], params, request.n)
    job.close()
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
        choices=[Choice(index=c.index, message=AssistantMessage(content="".join(c.text)),
                        finish_reason=c.finish_reason) for c in choices],
        usage=Usage(**job.tally.usage()))


def _chunk(chunk_id: str, created: int, model: str, index: int, delta: Delta, finish_reason: str | None = None) -> str:
    body = ChatCompletionChunk(id=chunk_id, created=created, model=model,
                               choices=[ChunkChoice(index=index, delta=delta, finish_reason=finish_reason)]).model_dump()
    # A delta carries only what changed; the other keys are OpenAI's, null included.
    body["choices"][0]["delta"] = {k: v for k, v in body["choices"][0]["delta"].items() if v is not None}
    return f"data: {json.dumps(body)}\n\n"


def _events(request: ChatCompletionRequest, job: generation.Job, deltas) -> AsyncIterator[str]:
    return generation.event_stream(request.model, job, deltas, _chunks(request, job, deltas), "/v1/chat/completions")


async def _chunks(request: ChatCompletionRequest, job: generation.Job, deltas) -> AsyncIterator[str]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    for index in range(request.n):
        yield _chunk(chunk_id, created, request.model, index, Delta(role="assistant", content=""))
    async for delta in deltas:
        yield _chunk(chunk_id, created, request.model, delta.index, Delta(content=delta.text or None),
                     delta.finish_reason)
    if request.stream_options and request.stream_options.include_usage:
        usage = ChatCompletionChunk(id=chunk_id, created=created, model=request.model, choices=[],
                                    usage=Usage(**job.tally.usage()))
        yield f"data: {usage.model_dump_json()}\n\n"
