"""Answers a text completion: tokenize each prompt (or take its token ids), run the
engine on the base model or an adapter for `n` choices per prompt (prompt i's
choice j has index i * n + j, as OpenAI numbers them), and shape the result as
OpenAI's text completion, or as its chunk stream (optional usage, then `[DONE]`)."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from libs.common.errors import InvalidArgument
from services.serving.api import generation, logprobs
from services.serving.api.chat_completions.schema import Usage
from services.serving.api.completions.schema import (
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
)
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
    if request.echo and request.logprobs is not None:
        raise InvalidArgument("echo together with logprobs is not supported by this server (it would need the "
                              "prompt's logprobs); send one of them", field="echo")
    job = generation.start(state, request, time.perf_counter())
    with generation.closed_on_failure(job):
        prompts = await _token_ids(request, state)
        # Every prompt must fit with its completion; the tightest one decides, as in OpenAI's check.
        longest = max(len(p) for p in prompts)
        max_tokens = state.engine.completion_budget(longest, request.max_tokens, prompt_field="prompt")
        params = generation.sampling_params(request, max_tokens, state.engine, generation.completion_protocol())
        job.tally.prompt_tokens = sum(len(p) for p in prompts)
        echoed = await _echoed(request, state, prompts)
        if request.stream:
            deltas = await generation.open_stream(job, prompts, params, request.n)
            return _events(request, job, deltas, echoed)
        choices = await generation.complete(job, prompts, params, request.n)
    job.close()
    tokenizer = state.engine.tokenizer()
    return Completion(
        id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
        choices=[CompletionChoice(
            index=c.index, text=echoed[c.index // request.n] + "".join(c.text), finish_reason=c.finish_reason,
            logprobs=_logprobs(request, c.tokens, tokenizer, len(echoed[c.index // request.n])))
            for c in choices],
        usage=Usage(**job.tally.usage()))


async def _echoed(request: CompletionRequest, state: ServingState, prompts: list[list[int]]) -> list[str]:
    """Each prompt's text as `echo` puts it before its choices (token-id prompts decoded), else ""."""
    if not request.echo:
        return [""] * len(prompts)
    texts = request.prompts()
    tokenizer = state.engine.tokenizer()
    return [text if isinstance(text, str) else tokenizer.decode(ids) for text, ids in zip(texts, prompts)]


def _logprobs(request: CompletionRequest, tokens, tokenizer, offset: int) -> CompletionLogprobs | None:
    if request.logprobs is None:
        return None
    return CompletionLogprobs(**logprobs.completion(tokens, request.logprobs, tokenizer, offset))


def _events(request: CompletionRequest, job: generation.Job, deltas, echoed: list[str] | None = None
            ) -> AsyncIterator[str]:
    echoed = echoed if echoed is not None else [""] * len(request.prompts())
    return generation.event_stream(request.model, job, deltas, _chunks(request, job, deltas, echoed),
                                   "/v1/completions")


async def _chunks(request: CompletionRequest, job: generation.Job, deltas, echoed: list[str]) -> AsyncIterator[str]:
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    tokenizer = job.state.engine.tokenizer() if request.logprobs is not None else None
    # Where each choice's next text starts (text_offset of its logprobs counts from its first character).
    offsets = [len(echoed[index // request.n]) for index in range(len(echoed) * request.n)]

    def event(choices: list[CompletionChoice], usage: Usage | None = None) -> str:
        body = Completion(id=completion_id, created=created, model=request.model, choices=choices, usage=usage)
        return f"data: {body.model_dump_json()}\n\n"

    if request.echo:
        for index in range(len(offsets)):
            yield event([CompletionChoice(index=index, text=echoed[index // request.n], finish_reason=None)])
    async for delta in deltas:
        if not (delta.text or delta.finish_reason is not None or (request.logprobs is not None and delta.tokens)):
            continue
        choice_logprobs = _logprobs(request, delta.tokens, tokenizer, offsets[delta.index])
        offsets[delta.index] += len(delta.text)
        yield event([CompletionChoice(index=delta.index, text=delta.text, finish_reason=delta.finish_reason,
                                      logprobs=choice_logprobs)])
    if request.stream_options and request.stream_options.include_usage:
        yield event([], Usage(**job.tally.usage()))
