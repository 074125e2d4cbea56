"""Answers a text completion: tokenize each prompt (or take its token ids), run the
engine on the base model or an adapter for `n` choices per prompt (prompt i's
choice j has index i * n + j, as OpenAI numbers them), and shape the result as
OpenAI's text completion, or as its chunk stream (optional usage, then `[DONE]`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from libs.common.errors import InvalidArgument
from services.serving.api import generation
from services.serving.api.chat_completions.schema import Usage
from services.serving.api.completions.schema import Completion, CompletionChoice, CompletionRequest
from services.serving.api.state import ServingState


async def _token_ids(request: CompletionRequest, state: ServingState) -> list[list[int]]:
    prompts = []
    for i, prompt in enumerate(request.prompts()):
        place = "prompt" if len(request.prompts()) == 1 else f"prompt.{i}"
        if isinstance(prompt, str):
            ids = await state.engine.text_prompt(prompt)
            if not ids:
                raise InvalidArgument("must not be empty", field=place)
        else:
            state.engine.check_token_ids(prompt, place)
            ids = list(prompt)
        prompts.append(ids)
    return prompts


async def create(request: CompletionRequest, state: ServingState) -> Completion | AsyncIterator[str]:
    """A whole completion, or (stream) an iterator of server-sent events. Errors
    before the first token raise (the HTTP status tells them); later ones end the
    stream with an error event."""
    job = generation.start(state, request, time.perf_counter())
    with generation.closed_on_failure(job):
        prompts = await _token_ids(request, state)
        # Every prompt must fit with its completion; the tightest one decides, as in OpenAI's check.
        longest = max(len(p) for p in prompts)
        max_tokens = state.engine.completion_budget(longest, request.max_tokens, prompt_field="prompt")
        params = generation.sampling_params(request, max_tokens)
        job.tally.prompt_tokens = sum(len(p) for p in prompts)
        if request.stream:
            deltas = await generation.open_stream(job, prompts, params, request.n)
            return _events(request, job, deltas)
        choices = await generation.complete(job, prompts, params, request.n)
    job.close()
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
        choices=[CompletionChoice(index=c.index, text="".join(c.text), finish_reason=c.finish_reason)
                 for c in choices],
        usage=Usage(**job.tally.usage()))


def _events(request: CompletionRequest, job: generation.Job, deltas) -> AsyncIterator[str]:
    return generation.event_stream(request.model, job, deltas, _chunks(request, job, deltas), "/v1/completions")


async def _chunks(request: CompletionRequest, job: generation.Job, deltas) -> AsyncIterator[str]:
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = Completion(id=completion_id, created=created, model=request.model, choices=choices, usage=usage)
        return f"data: {body.model_dump_json()}\n\n"

    async for delta in deltas:
        yield event([CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason)])
    if request.stream_options and request.stream_options.include_usage:
        yield event([], Usage(**job.tally.usage()))
