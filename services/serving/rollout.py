"""The rollout gRPC service (RolloutService.Generate): completions of prompts given as token
ids, for the trainer's online methods (--vllm_mode server). Each prompt carries its own seed;
the n completions of all prompts run in the engine at once, on the base model or an adapter
(pinned for the whole call, so a version pushed meanwhile serves the next call).

Like AdapterService it runs on the admin gRPC server's threads and calls into the engine's
asyncio loop; it shares the HTTP API's admission bound and per-model token counts."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
import uuid

from libs.common.errors import (Cancelled, InvalidArgument, ResourceExhausted, TuneForgeError, Unavailable,
                                grpc_errors)
from libs.common.vllm_platform import MAX_SEED
from protos.tuneforge.serving.v1 import serving_pb2, serving_pb2_grpc
from services.serving import metrics
from services.serving.api.state import ServingState

SERVICE_NAME = serving_pb2.DESCRIPTOR.services_by_name["RolloutService"].full_name
# Sequences (prompts x n) one call may ask for: the engine takes them all at once, and one call
# must not queue unbounded work (a rollout of 512 prompts x 8 generations is 4096).
MAX_SEQUENCES = 4096

_FINISH = {"stop": serving_pb2.FINISH_REASON_STOP, "length": serving_pb2.FINISH_REASON_LENGTH}


def sampling_params(sampling: serving_pb2.RolloutSampling, seed: int | None):
    """vLLM's SamplingParams of one prompt; bad values are INVALID_ARGUMENT naming the field."""
    from vllm.exceptions import VLLMValidationError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    n = sampling.n or 1
    if n < 1:
        raise InvalidArgument(f"must be at least 1; got {sampling.n}", field="sampling.n")
    if sampling.max_tokens < 1:
        raise InvalidArgument(f"must be at least 1; got {sampling.max_tokens}", field="sampling.max_tokens")
    if not (math.isfinite(sampling.temperature) and sampling.temperature >= 0):
        raise InvalidArgument(f"must be a number of at least 0; got {sampling.temperature}",
                              field="sampling.temperature")
    top_p = sampling.top_p if sampling.HasField("top_p") else 1.0
    if not 0 < top_p <= 1:
        raise InvalidArgument(f"must be in (0, 1]; got {top_p}", field="sampling.top_p")
    top_k = sampling.top_k if sampling.HasField("top_k") else -1
    if top_k < -1:
        raise InvalidArgument(f"must be -1 or 0 (off), or at least 1; got {top_k}", field="sampling.top_k")
    if seed is not None and seed + n - 1 > MAX_SEED:
        # Completion i draws with seed + i, and a torch generator's seed has 64 bits.
        raise InvalidArgument(f"seed {seed} + n - 1 is above {MAX_SEED}", field="prompts.seed")
    try:
        return SamplingParams(n=n, max_tokens=sampling.max_tokens, temperature=sampling.temperature, top_p=top_p,
                              top_k=top_k, seed=seed, stop_token_ids=list(sampling.stop_token_ids) or None,
                              output_kind=RequestOutputKind.FINAL_ONLY,
                              # token ids in, token ids out: no text is made (nor paid for in this process)
                              detokenize=False)
    except VLLMValidationError as exc:
        raise InvalidArgument(str(exc.args[0]) if exc.args else "invalid sampling parameters",
                              field=f"sampling.{exc.parameter}" if exc.parameter else "sampling") from exc
    except ValueError as exc:
        raise InvalidArgument(str(exc), field="sampling") from exc


class RolloutService(serving_pb2_grpc.RolloutServiceServicer):
    def __init__(self, state: ServingState, loop: asyncio.AbstractEventLoop):
        self.state = state
        self.loop = loop

    @grpc_errors
    def Generate(self, request, context):
        future = asyncio.run_coroutine_threadsafe(self._generate(request), self.loop)
        # A caller that leaves (deadline, cancel) aborts its requests in the engine.
        context.add_callback(future.cancel)
        try:
            return future.result()
        except concurrent.futures.CancelledError as exc:
            raise Cancelled("the call was cancelled") from exc

    async def _generate(self, request) -> serving_pb2.GenerateResponse:
        state = self.state
        if state.draining:
            raise Unavailable("the server is draining")
        if not request.prompts:
            raise InvalidArgument("give at least one prompt", field="prompts")
        sequences = len(request.prompts) * max(1, request.sampling.n)
        if sequences > MAX_SEQUENCES:
            raise ResourceExhausted(f"{len(request.prompts)} prompts x n {max(1, request.sampling.n)} = {sequences} "
                                    f"sequences, above {MAX_SEQUENCES} per call: split the rollout", field="prompts")
        for stop in request.sampling.stop_token_ids:
            state.engine.check_token_ids([stop], "sampling.stop_token_ids")
        params, prompt_tokens = [], 0
        for index, prompt in enumerate(request.prompts):
            field = f"prompts[{index}].token_ids"
            if not prompt.token_ids:
                raise InvalidArgument("must not be empty", field=field)
            state.engine.check_token_ids(list(prompt.token_ids), field)
            state.engine.completion_budget(len(prompt.token_ids), request.sampling.max_tokens, prompt_field=field)
            params.append(sampling_params(request.sampling, prompt.seed if prompt.HasField("seed") else None))
            prompt_tokens += len(prompt.token_ids)
        model = request.model or state.base_name
        with state.registry.lease(model) as lease:  # NotFound for an unknown model
            ticket = state.admission.admit()  # ResourceExhausted over --max_concurrent_requests
            try:
                if (child := metrics.MODELS.child(metrics.REQUESTS, model)) is not None:
                    child.inc()
                started = time.perf_counter()
                outputs = await self._all(request.prompts, params, lease.lora)
            finally:
                ticket.release()
        response = serving_pb2.GenerateResponse()
        generated = 0
        for output in outputs:
            result = response.results.add()
            for completion in sorted(output.outputs, key=lambda c: c.index):
                result.completions.add(token_ids=completion.token_ids,
                                       finish_reason=_FINISH.get(completion.finish_reason,
                                                                 serving_pb2.FINISH_REASON_UNSPECIFIED))
                generated += len(completion.token_ids)
        for metric, value in ((metrics.PROMPT_TOKENS, prompt_tokens), (metrics.GENERATED_TOKENS, generated)):
            if (child := metrics.MODELS.child(metric, model)) is not None:
                child.inc(value)
        if (child := metrics.MODELS.child(metrics.REQUEST_LATENCY, model)) is not None:
            child.observe(time.perf_counter() - started)
        return response

    async def _all(self, prompts, params, lora) -> list:
        """Every prompt's final output; the first failure aborts the others in the engine."""
        # Rendered together first, so that the prompts reach the engine in one scheduler step.
        rendered = await self.state.engine.render([list(prompt.token_ids) for prompt in prompts])
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(self._one(engine_input, p, lora)) for engine_input, p in zip(rendered, params)]
        except BaseExceptionGroup as failed:
            raise next((e for e in failed.exceptions if isinstance(e, TuneForgeError)), failed.exceptions[0]) from None
        return [task.result() for task in tasks]

    async def _one(self, engine_input, params, lora):
        final = None
        async for output in self.state.engine.generate(engine_input, params, lora, request_id=uuid.uuid4().hex):
            final = output
        if final is None or not final.finished:
            raise TuneForgeError("the engine ended a rollout request without its final output")
        return final


def registrar(service: RolloutService):
    """The `register` callback of libs.common.server.create_server."""

    def register(server):
        serving_pb2_grpc.add_RolloutServiceServicer_to_server(service, server)
        return [SERVICE_NAME]

    return register
