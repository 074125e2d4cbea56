"""Answers a chat completion: render the messages with the model's chat template,
run the engine on the base model or an adapter for `n` choices, and shape the
result as OpenAI's completion, or as its chunk stream (each choice's role first,
text deltas, finish reasons, optional usage, then `[DONE]`)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator

from libs.common.errors import InvalidArgument
from services.serving.api import generation, logprobs
from services.serving.api.chat_completions.schema import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    Usage,
)
from services.serving.api.state import ServingState


def check_tool_choice(request: ChatCompletionRequest, state: ServingState) -> None:
    """vLLM's rules (its OnlineRenderer's): tool_choice needs tools; without a tool parser only
    "none" is served, and "auto" (the default when tools are given) also needs
    --enable_auto_tool_choice. The same flags as `vllm serve`, the same refusals."""
    choice = request.tool_choice
    if choice is None and request.tools:
        choice = "auto"
    if choice is None or choice == "none":
        return
    if not request.tools:
        raise InvalidArgument("When using `tool_choice`, `tools` must be set.", field="tool_choice")
    if not isinstance(choice, str):
        names = [tool.function.name for tool in request.tools]
        if choice.function.name not in names:
            raise InvalidArgument(f"The tool specified in `tool_choice` ({choice.function.name}) does not match "
                                  f"any of the tools ({', '.join(names)})", field="tool_choice")
    if state.tool_call_parser is None:
        wanted = f'function "{choice.function.name}"' if not isinstance(choice, str) else f'"{choice}"'
        needs = "--enable_auto_tool_choice and --tool_call_parser" if choice == "auto" else "--tool_call_parser"
        raise InvalidArgument(f"tool_choice={wanted} requires the server to be started with {needs}; "
                              'send tool_choice "none" to render the tools without parsing calls', field="tool_choice")
    if choice == "auto" and not state.enable_auto_tool_choice:
        raise InvalidArgument('"auto" tool choice requires --enable_auto_tool_choice and --tool_call_parser '
                              "to be set", field="tool_choice")


def top_k(request: ChatCompletionRequest) -> int:
    return request.top_logprobs or 0


class _ToolRequest:
    """vLLM's request as its tool parser adjusted it (the tool-call constraint), kept for parsing the answer."""

    def __init__(self, calling):
        self.calling, self.request = calling, None

    def __call__(self, request):
        self.request = self.calling.adjust(request)
        return self.request


def _sampling(request: ChatCompletionRequest, state: ServingState, max_tokens: int):
    """The sampling parameters and, when this request's tool calls are parsed, vLLM's request
    its parser reads: tools and tool_choice go to vLLM's protocol, which the parser adjusts."""
    protocol = generation.chat_protocol()
    if state.tool_calling is None or not request.tools:
        return generation.sampling_params(request, max_tokens, state.engine, protocol), None
    fields = {**request.vllm_fields(), "tools": [tool.model_dump(exclude_none=True) for tool in request.tools],
              "tool_choice": request.tool_choice if isinstance(request.tool_choice, str | None)
              else request.tool_choice.model_dump()}
    if request.parallel_tool_calls is not None:
        fields["parallel_tool_calls"] = request.parallel_tool_calls
    fields = {key: value for key, value in fields.items() if value is not None}
    tools = _ToolRequest(state.tool_calling)
    params = generation.sampling_params(request, max_tokens, state.engine, protocol, fields, tools)
    return params, tools.request


def _message(choice: generation.Choice, state: ServingState, tool_request) -> tuple[AssistantMessage, str | None]:
    text = "".join(choice.text)
    if tool_request is None:
        return AssistantMessage(content=text), choice.finish_reason
    parsed = state.tool_calling.parse(tool_request, text, (), choice.finish_reason)
    return AssistantMessage(content=parsed.content, tool_calls=parsed.tool_calls or None), parsed.finish_reason


async def create(request: ChatCompletionRequest, state: ServingState) -> ChatCompletion | AsyncIterator[str]:
    """A whole completion, or (stream) an iterator of server-sent events. Errors
    before the first token raise (the HTTP status tells them); later ones end the
    stream with an error event."""
    check_tool_choice(request, state)
    job = generation.start(state, request, time.perf_counter())
    with generation.closed_on_failure(job):
        tools = [tool.for_template() for tool in request.tools] if request.tools else None
        prompt = await state.engine.chat_prompt([m.for_template() for m in request.messages], tools)
        max_tokens = state.engine.completion_budget(len(prompt), request.completion_limit())
        params, tool_request = _sampling(request, state, max_tokens)
        job.tally.prompt_tokens = len(prompt)
        if request.stream:
            deltas = await generation.open_stream(job, [prompt], params, request.n)
            parsers = [state.tool_calling.stream(tool_request, prompt) if tool_request is not None else None
                       for _ in range(request.n)]
            return _events(request, job, deltas, parsers)
        choices = await generation.complete(job, [prompt], params, request.n)
    job.close()
    tokenizer = state.engine.tokenizer()
    answers = [_message(c, state, tool_request) for c in choices]
    return ChatCompletion(
        id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=request.model,
        choices=[Choice(index=c.index, message=message, finish_reason=finish_reason,
                        logprobs=ChoiceLogprobs(**logprobs.chat(c.tokens, top_k(request), tokenizer))
                        if request.logprobs else None)
                 for c, (message, finish_reason) in zip(choices, answers)],
        usage=Usage(**job.tally.usage()))


def _chunk(chunk_id: str, created: int, model: str, index: int, delta: Delta, finish_reason: str | None = None,
           choice_logprobs: ChoiceLogprobs | None = None) -> str:
    body = ChatCompletionChunk(id=chunk_id, created=created, model=model, choices=[ChunkChoice(
        index=index, delta=delta, finish_reason=finish_reason, logprobs=choice_logprobs)]).model_dump()
    # A delta carries only what changed; the other keys are OpenAI's, null included.
    body["choices"][0]["delta"] = delta.model_dump(exclude_none=True)
    return f"data: {json.dumps(body)}\n\n"


def _events(request: ChatCompletionRequest, job: generation.Job, deltas, parsers: list) -> AsyncIterator[str]:
    return generation.event_stream(request.model, job, deltas, _chunks(request, job, deltas, parsers),
                                   "/v1/chat/completions")


async def _chunks(request: ChatCompletionRequest, job: generation.Job, deltas, parsers: list) -> AsyncIterator[str]:
    chunk_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    for index in range(request.n):
        yield _chunk(chunk_id, created, request.model, index, Delta(role="assistant", content=""))
    tokenizer = job.state.engine.tokenizer() if request.logprobs else None
    async for delta in deltas:
        parser, content, calls, finish_reason = parsers[delta.index], delta.text or None, [], delta.finish_reason
        if parser is not None:  # text that may open a tool call is held until the parser knows
            content, calls = parser.delta(delta.text, [], delta.finish_reason)
            finish_reason = parser.finish_reason(delta.finish_reason) if delta.finish_reason is not None else None
        if not (content or calls or finish_reason is not None or (request.logprobs and delta.tokens)):
            continue
        yield _chunk(chunk_id, created, request.model, delta.index, Delta(content=content, tool_calls=calls or None),
                     finish_reason,
                     ChoiceLogprobs(**logprobs.chat(delta.tokens, top_k(request), tokenizer))
                     if request.logprobs else None)
    if request.stream_options and request.stream_options.include_usage:
        usage = ChatCompletionChunk(id=chunk_id, created=created, model=request.model, choices=[],
                                    usage=Usage(**job.tally.usage()))
        yield f"data: {usage.model_dump_json()}\n\n"
