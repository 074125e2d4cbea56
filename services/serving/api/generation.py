"""What the chat and text completion endpoints share: admitting a request, pinning
its model, sampling parameters, running the engine for `n` choices (whole, or as a
stream whose first output is awaited before answering, so refusals keep their
4xx), per-model token counts and latencies, and how a result goes out: JSON, or
server-sent events ending in `[DONE]` with a failure on the way as a final error event."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pydantic import BaseModel
from starlette.responses import JSONResponse, StreamingResponse

from libs.common.errors import InvalidArgument, TuneForgeError
from services.serving import metrics
from services.serving.adapters import Lease
from services.serving.admission import Ticket
from services.serving.api import logprobs, sampling
from services.serving.api.errors import sse_error, sse_unexpected, status_of
from services.serving.api.state import ServingState


def chat_protocol() -> type:
    """vLLM's pydantic ChatCompletionRequest (imported late: vLLM is heavy)."""
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest

    return ChatCompletionRequest


def completion_protocol() -> type:
    """vLLM's pydantic CompletionRequest."""
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest

    return CompletionRequest


def sampling_params(request, max_tokens: int, engine, protocol: type, fields: dict | None = None, adjust=None):
    """vLLM's SamplingParams for `request` (or its `fields` as given), made by vLLM's own request
    `protocol` model (services.serving.api.sampling); token ids it names must be in the vocabulary."""
    for place, token_ids in request.token_ids_to_check().items():
        engine.check_token_ids(token_ids, place)
    return sampling.vllm_params(protocol, request.vllm_fields() if fields is None else fields, max_tokens, adjust)


class Tally:
    """One request's token counts and latencies, recorded under its model's label."""

    def __init__(self, model: str, arrived: float, ticket: Ticket):
        self.model = model
        self.arrived = arrived
        self.ticket = ticket
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self._last: float | None = None
        self._recorded = False
        # The inter-token histogram's series, looked up once at the first token: per token, the
        # lookup (a lock and the label check) cost more than the observation itself.
        self._itl = None

    def add(self, token_ids) -> None:
        if not token_ids:
            return
        now = time.perf_counter()
        if self._last is None:
            self.ticket.started()
            if (child := metrics.MODELS.child(metrics.TIME_TO_FIRST_TOKEN, self.model)) is not None:
                child.observe(now - self.arrived)
            # the first delta's other tokens (n > 1, a busy engine) came with the first: gaps of 0, so
            # that every token after a request's first is one inter-token observation, whatever the load
            self._itl = metrics.MODELS.child(metrics.INTER_TOKEN_LATENCY, self.model)
            for _ in token_ids[1:] if self._itl is not None else ():
                self._itl.observe(0.0)
        elif self._itl is not None:
            # A delta can carry several tokens (n > 1, or a slow reader): spread the gap over them.
            # Once the model is unloaded its series are removed; this one then counts nowhere.
            gap = (now - self._last) / len(token_ids)
            for _ in token_ids:
                self._itl.observe(gap)
        self._last = now
        self.completion_tokens += len(token_ids)

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def record(self) -> None:
        """Once, when the request ends (finished, failed or abandoned)."""
        if self._recorded:
            return
        self._recorded = True
        self.ticket.release()
        for metric, value in ((metrics.PROMPT_TOKENS, self.prompt_tokens),
                              (metrics.GENERATED_TOKENS, self.completion_tokens)):
            if (child := metrics.MODELS.child(metric, self.model)) is not None:
                child.inc(value)
        if (child := metrics.MODELS.child(metrics.REQUEST_LATENCY, self.model)) is not None:
            child.observe(time.perf_counter() - self.arrived)


def count_error(model: str, exc: TuneForgeError) -> None:
    """Counts a failed request under its model, if that model is served (an unknown
    model name never becomes a label)."""
    metrics.MODELS.error(model, status_of(exc))


@dataclass
class Job:
    """An admitted request on one model: its lease, ticket and tally. `close()` once."""

    state: ServingState
    model: str
    lease: Lease
    tally: Tally

    @classmethod
    def open(cls, state: ServingState, model: str, arrived: float) -> "Job":
        lease = state.registry.lease(model)  # NotFound for an unknown model
        try:
            ticket = state.admission.admit()  # ResourceExhausted (429) over capacity
        except BaseException:
            lease.release()
            raise
        if (child := metrics.MODELS.child(metrics.REQUESTS, model)) is not None:
            child.inc()
        return cls(state, model, lease, Tally(model, arrived, ticket))

    def close(self) -> None:
        self.lease.release()
        self.tally.record()


def start(state: ServingState, request, arrived: float) -> Job:
    """Opens the job of a chat or text completion request: parameters this server does not
    implement are refused first (400), then the model is pinned and the request admitted."""
    unsupported = request.unsupported()
    if unsupported:
        raise InvalidArgument(f"{', '.join(unsupported)}: not supported by this server", field=unsupported[0])
    try:
        return Job.open(state, request.model, arrived)
    except TuneForgeError as exc:
        count_error(request.model, exc)
        raise


DONE = "data: [DONE]\n\n"


def response(result: BaseModel | AsyncIterator[str]) -> JSONResponse | StreamingResponse:
    """A handler's answer as HTTP: a whole completion as JSON, a stream as server-sent events
    (no-cache and no proxy buffering: each event must reach the client as it is written)."""
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(result, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def event_stream(model: str, job: Job, deltas: AsyncIterator, events: AsyncIterator[str],
                       path: str) -> AsyncIterator[str]:
    """A started stream: `events` (built from `deltas`), then `data: [DONE]`. The status line
    is already sent, so a failure on the way becomes one final error event (typed errors are
    counted under `model`); the events, the engine stream and the job are closed whatever
    happens, a client that goes away included."""
    try:
        async for event in events:
            yield event
    except TuneForgeError as exc:
        count_error(model, exc)
        yield sse_error(exc)
    except Exception as exc:  # noqa: BLE001 - the client learns of it only here
        yield sse_unexpected(exc, path)
    finally:
        await events.aclose()
        await deltas.aclose()
        job.close()
    yield DONE


@contextlib.contextmanager
def closed_on_failure(job: Job):
    """Closes `job` when the block fails, counting a typed error under its model; on
    success the caller closes it (at once, or when its stream ends)."""
    try:
        yield
    except TuneForgeError as exc:
        count_error(job.model, exc)
        job.close()
        raise
    except BaseException:
        job.close()
        raise


@contextlib.contextmanager
def _naming_response_format(params):
    """The structured-output backend refuses a schema it cannot compile without naming a
    parameter; the request's only source of one is `response_format`."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.field is None and getattr(params, "structured_outputs", None) is not None:
            raise InvalidArgument(exc.message, field="response_format") from exc
        raise


@dataclass
class Choice:
    """One choice's text, finish reason and (when asked for) token logprobs, assembled from deltas."""

    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    tokens: list[logprobs.TokenChoice] = field(default_factory=list)


def _tokens_of(completion) -> list[logprobs.TokenChoice]:
    return logprobs.pair(completion.token_ids, completion.logprobs) if completion.logprobs is not None else []


async def complete(job: Job, prompts: list[list[int]], params, n: int) -> list[Choice]:
    """Every prompt's `n` choices, whole; prompt i's choice j has index i * n + j. The prompts
    go to the engine together (continuous batching), not one after another."""
    choices = [Choice(index) for index in range(len(prompts) * n)]
    prompts = await job.state.engine.render(prompts)  # all at once: they reach the engine together

    async def run(i: int, prompt) -> None:
        async with contextlib.aclosing(job.state.engine.generate(prompt, params, job.lease.lora)) as outputs:
            async for output in outputs:
                for completion in output.outputs:
                    choice = choices[i * n + completion.index]
                    choice.text.append(completion.text)
                    choice.tokens.extend(_tokens_of(completion))
                    job.tally.add(completion.token_ids)
                    if completion.finish_reason is not None:
                        choice.finish_reason = completion.finish_reason

    with _naming_response_format(params):
        if len(prompts) == 1:
            await run(0, prompts[0])
        else:
            try:
                async with asyncio.TaskGroup() as group:  # one failure cancels the others
                    for i, prompt in enumerate(prompts):
                        group.create_task(run(i, prompt))
            except BaseExceptionGroup as group_error:  # the first failure is the request's
                raise group_error.exceptions[0] from None
    return choices


@dataclass
class Delta:
    """One streamed piece of one choice."""

    index: int
    text: str
    finish_reason: str | None
    tokens: list[logprobs.TokenChoice] = field(default_factory=list)


async def open_stream(job: Job, prompts: list[list[int]], params, n: int) -> AsyncIterator[Delta]:
    """Starts every prompt (together: the engine batches them) and waits for the first output
    of any of them, so that a request the engine refuses raises here (its HTTP status) instead of
    becoming an error event: the prompts share their parameters, so a refusal of them comes
    first. Their deltas then interleave as the engine produces them. Waiting for every prompt's
    first output put the slowest prompt's wait on the request's first token (the engine may start
    a step with the first prompt alone: 4 prompts, 36 ms instead of 17)."""
    rendered = await job.state.engine.render(prompts)  # all at once: they reach the engine together
    streams = [job.state.engine.generate(prompt, params, job.lease.lora) for prompt in rendered]
    firsts = [asyncio.ensure_future(anext(stream, None)) for stream in streams]
    try:
        with _naming_response_format(params):
            done, _ = await asyncio.wait(firsts, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()
    except BaseException:
        await _stop(firsts, streams)
        raise
    if len(streams) == 1:
        return _deltas(job, n, 0, streams[0], firsts[0].result())
    return _merged(job, n, streams, firsts)


async def _stop(tasks: list[asyncio.Future], streams: list) -> None:
    """Cancels `tasks` (each advancing one of `streams`), waits for them, then closes every stream."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for stream in streams:
        await stream.aclose()


async def _deltas(job: Job, n: int, prompt: int, outputs, first) -> AsyncIterator[Delta]:
    """One prompt's deltas; closes its engine stream whatever happens."""
    try:
        output = first
        while output is not None:
            for completion in output.outputs:
                job.tally.add(completion.token_ids)
                if completion.text or completion.finish_reason is not None or completion.token_ids:
                    yield Delta(prompt * n + completion.index, completion.text, completion.finish_reason,
                                _tokens_of(completion))
            output = await anext(outputs, None)
    finally:
        await outputs.aclose()


async def _merged(job: Job, n: int, streams: list, firsts: list[asyncio.Future]) -> AsyncIterator[Delta]:
    """Several prompts' deltas in the order they come: one task per prompt feeds a queue (a
    generator can only be advanced by one task at a time, so each task owns its stream, from
    the task awaiting its first output on)."""
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(prompt: int, stream, first: asyncio.Future) -> None:
        try:
            async for delta in _deltas(job, n, prompt, stream, await first):
                await queue.put(delta)
            await queue.put(done)
        except Exception as exc:  # noqa: BLE001 - handed to the reader, which raises it
            await queue.put(exc)

    tasks = [asyncio.create_task(pump(i, stream, first)) for i, (stream, first) in enumerate(zip(streams, firsts))]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield item
    finally:
        await _stop([*tasks, *firsts], streams)
