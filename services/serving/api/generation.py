"""What the chat and text completion endpoints share: admitting a request, pinning
its model, sampling parameters, running the engine for `n` choices (whole, or as a
stream whose first output is awaited before answering, so refusals keep their
4xx), per-model token counts and latencies, and how a result goes out: JSON, or
server-sent events ending in `[DONE]` with a failure on the way as a final error event."""

from __future__ import annotations

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
from services.serving.api.errors import sse_error, sse_unexpected, status_of
from services.serving.api.state import ServingState


def sampling_params(request, max_tokens: int):
    """vLLM's SamplingParams from the fields both endpoints share (temperature, top_p,
    stop, seed, n); DELTA outputs so that every token is seen as it comes."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    try:
        return SamplingParams(
            n=request.n,
            # OpenAI's defaults when the request leaves them out.
            temperature=1.0 if request.temperature is None else request.temperature,
            top_p=1.0 if request.top_p is None else request.top_p,
            max_tokens=max_tokens,
            stop=request.stop_list() or None,
            seed=request.seed,
            output_kind=RequestOutputKind.DELTA,
        )
    except VLLMValidationError as exc:
        raise InvalidArgument(str(exc.args[0]) if exc.args else "invalid sampling parameters",
                              field=exc.parameter) from exc
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from exc


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
            child = metrics.MODELS.child(metrics.INTER_TOKEN_LATENCY, self.model)
            for _ in token_ids[1:] if child is not None else ():
                child.observe(0.0)
        elif (child := metrics.MODELS.child(metrics.INTER_TOKEN_LATENCY, self.model)) is not None:
            # A delta can carry several tokens (n > 1, or a slow reader): spread the gap over them.
            gap = (now - self._last) / len(token_ids)
            for _ in token_ids:
                child.observe(gap)
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


@dataclass
class Choice:
    """One choice's text and finish reason, assembled from deltas."""

    index: int
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None


async def complete(job: Job, prompts: list[list[int]], params, n: int) -> list[Choice]:
    """Every prompt's `n` choices, whole; prompt i's choice j has index i * n + j."""
    choices = [Choice(index) for index in range(len(prompts) * n)]
    for i, prompt in enumerate(prompts):
        async with contextlib.aclosing(job.state.engine.generate(prompt, params, job.lease.lora)) as outputs:
            async for output in outputs:
                for completion in output.outputs:
                    choice = choices[i * n + completion.index]
                    choice.text.append(completion.text)
                    job.tally.add(completion.token_ids)
                    if completion.finish_reason is not None:
                        choice.finish_reason = completion.finish_reason
    return choices


@dataclass
class Delta:
    """One streamed piece of one choice."""

    index: int
    text: str
    finish_reason: str | None


async def open_stream(job: Job, prompts: list[list[int]], params, n: int) -> AsyncIterator[Delta]:
    """Starts the first prompt and waits for its first output, so that a request the
    engine refuses raises here (its HTTP status) instead of becoming an error event.
    The prompts then stream one after another."""
    outputs = job.state.engine.generate(prompts[0], params, job.lease.lora)
    try:
        first = await anext(outputs, None)
    except BaseException:
        await outputs.aclose()
        raise
    return _deltas(job, prompts, params, n, outputs, first)


async def _deltas(job: Job, prompts, params, n: int, outputs, first) -> AsyncIterator[Delta]:
    try:
        for i in range(len(prompts)):
            if i:
                await outputs.aclose()
                outputs = job.state.engine.generate(prompts[i], params, job.lease.lora)
                first = await anext(outputs, None)
            output = first
            while output is not None:
                for completion in output.outputs:
                    job.tally.add(completion.token_ids)
                    if completion.text or completion.finish_reason is not None:
                        yield Delta(i * n + completion.index, completion.text, completion.finish_reason)
                output = await anext(outputs, None)
    finally:
        await outputs.aclose()
