"""Answers a chat completion: render the messages with the model's chat template,
run the engine on the base model or an adapter, and shape the result as OpenAI's
completion, or as its chunk stream (role first, text deltas, finish reason,
optional usage, then `[DONE]`)."""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator

from libs.common.errors import InvalidArgument, TuneForgeError
from services.serving import metrics
from services.serving.adapters import Lease
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
from services.serving.api.errors import sse_error
from services.serving.api.state import ServingState

DONE = "data: [DONE]\n\n"


def sampling_params(request: ChatCompletionRequest, max_tokens: int):
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    try:
        return SamplingParams(
            n=1,
            # OpenAI's defaults when the request leaves them out.
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_tokens=max_tokens,
            stop=request.stop_list() or None,
            seed=request.seed,
            # Deltas: both paths see each token as it comes (time to first token), streamed or not.
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMValidationError as exc:
        raise InvalidArgument(str(exc.args[0]) if exc.args else "invalid sampling parameters",
                              field=exc.parameter) from exc
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


class _Tally:
    """Counts one request's tokens and times its first one."""

    def __init__(self, prompt_tokens: int, arrived: float):
        self.prompt_tokens = prompt_tokens
        self.completion_tokens = 0
        self.arrived = arrived
        self.first_token_seen = False

    def add(self, token_ids) -> None:
        if token_ids and not self.first_token_seen:
            self.first_token_seen = True
            metrics.TIME_TO_FIRST_TOKEN.observe(time.perf_counter() - self.arrived)
        self.completion_tokens += len(token_ids)

    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens,
                     total_tokens=self.prompt_tokens + self.completion_tokens)

    def record(self) -> None:
        metrics.PROMPT_TOKENS.inc(self.prompt_tokens)
        metrics.GENERATED_TOKENS.inc(self.completion_tokens)


async def create(request: ChatCompletionRequest, state: ServingState) -> ChatCompletion | AsyncIterator[str]:
    """A whole completion, or (stream) an iterator of server-sent events. Errors
    before the first token raise (the HTTP status tells them); later ones end the
    stream with an error event."""
    arrived = time.perf_counter()
    unsupported = request.unsupported()
    if unsupported:
        raise InvalidArgument(f"{', '.join(unsupported)}: not supported by this server", field=unsupported[0])
    lease = state.registry.lease(request.model)  # NotFound for an unknown model
    try:
        prompt = await state.engine.chat_prompt([m.for_template() for m in request.messages])
        max_tokens = state.engine.completion_budget(len(prompt), request.completion_limit())
        params = sampling_params(request, max_tokens)
        tally = _Tally(len(prompt), arrived)
        if request.stream:
            return await _stream(request, state, prompt, params, lease, tally)
        with lease:
            return await _complete(request, state, prompt, params, lease, tally)
    except BaseException:
        lease.release()
        raise


async def _complete(request, state, prompt, params, lease: Lease, tally: _Tally) -> ChatCompletion:
    text: list[str] = []
    finish_reason = None
    async with contextlib.aclosing(state.engine.generate(prompt, params, lease.lora)) as outputs:
        async for output in outputs:
            completion = output.outputs[0]
            text.append(completion.text)
            tally.add(completion.token_ids)
            if output.finished:
                finish_reason = completion.finish_reason
    tally.record()
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
        choices=[Choice(index=0, message=AssistantMessage(content="".join(text)), finish_reason=finish_reason)],
        usage=tally.usage())


async def _stream(request, state, prompt, params, lease: Lease, tally: _Tally) -> AsyncIterator[str]:
    outputs = state.engine.generate(prompt, params, lease.lora)
    try:
        # Wait for the first output before answering, so that a request the engine
        # refuses gets its 4xx status instead of a 200 with an error event.
        first = await anext(outputs, None)
    except BaseException:
        await outputs.aclose()
        raise
    return _events(request, outputs, first, lease, tally)


def _chunk(chunk_id: str, created: int, model: str, delta: Delta, finish_reason: str | None = None) -> str:
    body = ChatCompletionChunk(id=chunk_id, created=created, model=model,
                               choices=[ChunkChoice(index=0, delta=delta, finish_reason=finish_reason)]).model_dump()
    # A delta carries only what changed; the other keys are OpenAI's, null included.
    body["choices"][0]["delta"] = {k: v for k, v in body["choices"][0]["delta"].items() if v is not None}
    return f"data: {json.dumps(body)}\n\n"


async def _events(request: ChatCompletionRequest, outputs, first, lease: Lease, tally: _Tally) -> AsyncIterator[str]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    try:
        yield _chunk(chunk_id, created, request.model, Delta(role="assistant", content=""))
        output = first
        while output is not None:
            completion = output.outputs[0]
            tally.add(completion.token_ids)
            finish_reason = completion.finish_reason if output.finished else None
            if completion.text or finish_reason:
                yield _chunk(chunk_id, created, request.model, Delta(content=completion.text or None), finish_reason)
            output = await anext(outputs, None)
        if request.stream_options and request.stream_options.include_usage:
            usage = ChatCompletionChunk(id=chunk_id, created=created, model=request.model, choices=[],
                                        usage=tally.usage())
            yield f"data: {usage.model_dump_json()}\n\n"
    except TuneForgeError as exc:
        yield sse_error(exc)
    finally:
        await outputs.aclose()
        lease.release()
        tally.record()
    yield DONE
