"""The one wrapper around vLLM's async engine (v1 `AsyncLLM`): start it, render
chat prompts, generate with or without a LoRA, add and remove LoRAs, shut down.
vLLM's exceptions end here and leave as typed TuneForge errors."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import pathlib
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from libs.common import logs
from libs.common.errors import FailedPrecondition, InvalidArgument, Unavailable
from libs.common.vllm_platform import on_cpu, platform_defaults
from services.serving.scratch import Scratch

if TYPE_CHECKING:  # vLLM is imported when the engine starts, so that config and tests stay light
    from vllm.lora.request import LoRARequest
    from vllm.outputs import RequestOutput
    from vllm.sampling_params import SamplingParams

LOG = logging.getLogger("tuneforge.serving.engine")
MASKED_ROWS_EXTENSION = "services.serving.lora_mask.WorkerExtension"


class Engine:
    """A started vLLM engine with LoRA enabled. Create it with `Engine.start` inside
    the asyncio loop that will serve requests."""

    def __init__(self, llm, model_dir: pathlib.Path, started_seconds: float):
        self.llm = llm
        self.model_dir = model_dir
        self.started_seconds = started_seconds
        self._lora_ids = itertools.count(1)
        # The engine's own hold on each adapter's files (see `add_lora`), removed at shutdown.
        self._scratch = Scratch()

    @classmethod
    def start(cls, model_dir: pathlib.Path, max_loras: int, max_lora_rank: int,
              max_model_len: int | None = None, torch_dtype: str | None = None,
              max_cpu_loras: int | None = None) -> "Engine":
        dtype = platform_defaults(torch_dtype)
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        from services.serving.engine_stats import EngineStatLogger

        args = AsyncEngineArgs(
            model=str(model_dir),
            dtype=dtype,
            enable_lora=True,
            max_loras=max_loras,
            # vLLM's worker keeps this many adapters in an LRU cache and reloads an evicted one
            # from its path on the next request; its scheduler holds back requests beyond max_loras.
            max_cpu_loras=max_cpu_loras,
            max_lora_rank=max_lora_rank,
            max_model_len=max_model_len,
            # vLLM's own stat loggers register `vllm:` metrics (colon names fail promlint); ours
            # (passed below) writes the engine's statistics under tuneforge_serving_engine_*.
            disable_log_stats=True,
            # vLLM imports this class in the process that runs the model: that installs the patch
            # that keeps base rows of a mixed batch the base model's (see `mix_safely`).
            worker_extension_cls=MASKED_ROWS_EXTENSION if on_cpu() else "",
        )
        started = time.perf_counter()
        try:
            llm = AsyncLLM.from_engine_args(args, stat_loggers=[EngineStatLogger])
        except (ValueError, TypeError) as exc:  # vLLM's config checks (model, dtype, lengths)
            raise FailedPrecondition(f"vLLM refused the engine configuration: {exc}", field="model") from exc
        seconds = time.perf_counter() - started
        engine = cls(llm, model_dir, seconds)
        logs.log(LOG, logging.INFO, "engine started", model=str(model_dir), dtype=dtype, seconds=round(seconds, 2),
                 max_model_len=engine.max_model_len, max_loras=max_loras, max_cpu_loras=max_cpu_loras or max_loras,
                 max_lora_rank=max_lora_rank)
        return engine

    @property
    def max_model_len(self) -> int:
        return self.llm.model_config.max_model_len

    # -- prompts ---------------------------------------------------------------------------

    def tokenizer(self):
        return self.llm.get_tokenizer()

    async def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None,
                          add_generation_prompt: bool = True) -> list[int]:
        """Token ids of `messages` (and `tools`, as `apply_chat_template(tools=...)` renders
        them) with the model's chat template, ending in the assistant's turn
        (add_generation_prompt). Tokenizing can take a while on long conversations, so it
        runs off the event loop."""
        return await asyncio.to_thread(render_chat, self.llm.get_tokenizer(), messages, self.model_dir, tools,
                                       add_generation_prompt)

    async def text_prompt(self, text: str) -> list[int]:
        """Token ids of a raw completion prompt, with the tokenizer's special tokens (BOS)
        as vLLM adds them for /v1/completions."""
        tokenizer = self.llm.get_tokenizer()
        return await asyncio.to_thread(lambda: list(tokenizer.encode(text, add_special_tokens=True)))

    def check_token_ids(self, token_ids: list[int], field: str) -> None:
        """A prompt given as token ids must name tokens of this model's vocabulary."""
        vocab = len(self.llm.get_tokenizer())
        bad = next((t for t in token_ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise InvalidArgument(f"token id {bad} is outside the vocabulary [0, {vocab})", field=field)

    def completion_budget(self, prompt_tokens: int, max_tokens: int | None, prompt_field: str = "messages") -> int:
        """The completion length to ask for: `max_tokens`, or what is left of the context.
        InvalidArgument when the prompt and completion do not fit (the OpenAI wording)."""
        room = self.max_model_len - prompt_tokens
        if room < 1:
            raise InvalidArgument(
                f"This model's maximum context length is {self.max_model_len} tokens. However, your messages "
                f"resulted in {prompt_tokens} tokens, leaving no room for a completion.", field=prompt_field)
        if max_tokens is None:
            return room
        if max_tokens > room:
            raise InvalidArgument(
                f"This model's maximum context length is {self.max_model_len} tokens. However, you requested "
                f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the messages, {max_tokens} in the "
                "completion). Please reduce the length of the messages or completion.", field="max_tokens")
        return max_tokens

    # -- generation ------------------------------------------------------------------------

    async def render(self, prompts: list[list[int]]) -> list:
        """vLLM's engine inputs for token-id prompts, rendered in one call. A request's prompts
        then reach the engine core back to back, in one scheduler step: rendered one by one (each
        in its own task), the first reached the core alone and ran a step before the others
        joined, a step later (4 prompts: TTFT 33 ms, the first prompt's 23 ms)."""
        with _typed_errors():
            return await self.llm.renderer.render_cmpl_async([{"prompt_token_ids": p} for p in prompts])

    async def generate(self, prompt, params: "SamplingParams", lora: "LoRARequest | None" = None,
                       request_id: str | None = None) -> AsyncIterator["RequestOutput"]:
        """Streams the engine's outputs for one request (cumulative or delta, as
        `params.output_kind` says); `prompt` is token ids or an engine input from `render`.
        Cancelling the iteration aborts the request."""
        request_id = request_id or uuid.uuid4().hex
        if isinstance(prompt, list):
            (prompt,) = await self.render([prompt])
        with _typed_errors():
            # aclosing: when our caller stops early (client gone), vLLM aborts the request now,
            # not whenever the garbage collector finalizes its generator.
            async with contextlib.aclosing(self.llm.generate(prompt, params, request_id, lora_request=lora)) as outputs:
                async for output in outputs:
                    yield output

    # -- LoRA ------------------------------------------------------------------------------

    async def add_lora(self, name: str, path: pathlib.Path) -> "LoRARequest":
        """Loads an adapter under a fresh id; requests pass the returned LoRARequest."""
        from vllm.lora.request import LoRARequest

        lora_id = next(self._lora_ids)
        # The engine reads its own hard links of the files checked at load (services.serving.scratch).
        held = await asyncio.to_thread(self._scratch.hold, pathlib.Path(path), str(lora_id))
        # vLLM's prefix cache keys KV blocks by (lora_name, lora_path). A checkpoint can be
        # republished at the same path with new weights, so each load gets its own name.
        lora = LoRARequest(lora_name=f"{name}@{lora_id}", lora_int_id=lora_id, lora_path=str(held))
        try:
            loaded = await self.llm.add_lora(lora)
        except Exception as exc:  # the worker's error arrives as a bare Exception carrying its message
            self._scratch.release(held)
            raise FailedPrecondition(f"the engine could not load {path}: {exc}", field="path") from exc
        if not loaded:
            self._scratch.release(held)
            raise FailedPrecondition(f"the engine could not load {path}", field="path")
        return lora

    async def first_request(self, lora: "LoRARequest") -> None:
        """A one-token request on `lora`, answered and dropped: vLLM moves an adapter into
        a LoRA slot of the model at its first request; the registry has that done before
        traffic switches to a new version (see AdapterRegistry._first_request)."""
        from vllm.sampling_params import RequestOutputKind, SamplingParams

        tokenizer = self.llm.get_tokenizer()
        token = next((t for t in (tokenizer.bos_token_id, tokenizer.eos_token_id) if t is not None), 0)
        params = SamplingParams(max_tokens=1, temperature=0.0, output_kind=RequestOutputKind.FINAL_ONLY)
        async for _ in self.generate([token], params, lora, request_id=f"first-request-{lora.lora_name}"):
            pass

    async def mix_safely(self) -> None:
        """Checks that base rows batched with adapter rows stay the base model's. vLLM's PyTorch
        LoRA ops (the CPU backend's) gave them the last slot's adapter; the engine process runs
        them patched (services.serving.lora_mask), and this asks it whether the patch is in
        place: FailedPrecondition, not wrong answers, when it is not. CUDA's kernels skip
        rows without a LoRA themselves."""
        if not on_cpu():
            return
        masked = await self.llm.collective_rpc("tuneforge_lora_rows_masked")
        if not masked or not all(masked):
            raise FailedPrecondition("vLLM's engine process runs its LoRA ops unpatched: base-model rows batched "
                                     "with adapter rows would get an adapter applied", field="model")

    async def merge_single_lora(self, enabled: bool) -> None:
        """--lora_merge_single: a step whose tokens all run one adapter runs each LoRA layer as
        one product with W + B A of that adapter, cached per layer (libs.common.vllm_cpu_lora),
        in the engine process, through the worker extension. CPU only: CUDA's LoRA kernels are
        not vLLM's torch ops. FailedPrecondition when the engine process did not take it."""
        if not on_cpu():
            if enabled:
                raise FailedPrecondition("--lora_merge_single is for vLLM's CPU backend; this engine runs on "
                                         "another platform", field="lora_merge_single")
            return
        taken = await self.llm.collective_rpc("tuneforge_lora_merge_single", args=(enabled,))
        if not taken or any(on != enabled for on in taken):
            raise FailedPrecondition(f"vLLM's engine process did not turn the merged LoRA path "
                                     f"{'on' if enabled else 'off'}", field="lora_merge_single")
        logs.log(LOG, logging.INFO, "merged single-adapter LoRA path", lora_merge_single=enabled)

    async def remove_lora(self, lora: "LoRARequest") -> None:
        await self.llm.remove_lora(lora.lora_int_id)
        await asyncio.to_thread(self._scratch.release, lora.lora_path)

    # -- lifecycle -------------------------------------------------------------------------

    async def check_health(self) -> None:
        from vllm.v1.engine.exceptions import EngineDeadError

        try:
            await self.llm.check_health()
        except EngineDeadError as exc:
            raise Unavailable("the inference engine has stopped") from exc

    def shutdown(self) -> None:
        self.llm.shutdown()
        # Once is enough: vLLM's finalizer shuts down again, and when it runs at interpreter
        # exit (a reference outlived the caller) vLLM's module globals are gone and it prints a
        # TypeError traceback. An instance attribute wins over the method, so that call is a no-op.
        self.llm.shutdown = lambda timeout=None: None
        self._scratch.close()


@contextlib.contextmanager
def _typed_errors():
    """vLLM's request errors as ours: its validation errors name their parameter."""
    from vllm.exceptions import VLLMClientError, VLLMValidationError
    from vllm.v1.engine.exceptions import EngineDeadError

    try:
        yield
    except VLLMValidationError as exc:
        raise InvalidArgument(str(exc.args[0]) if exc.args else "invalid request", field=exc.parameter) from exc
    except VLLMClientError as exc:
        raise InvalidArgument(str(exc)) from exc
    except EngineDeadError as exc:
        raise Unavailable("the inference engine has stopped; restart the server") from exc


def render_chat(tokenizer, messages: list[dict], model_dir: pathlib.Path, tools: list[dict] | None = None,
                add_generation_prompt: bool = True) -> list[int]:
    """Token ids of `messages` rendered with the tokenizer's chat template, ending in the
    assistant's turn. A template that fails on the messages is the client's 400, not a 500."""
    import jinja2

    if not getattr(tokenizer, "chat_template", None):
        raise FailedPrecondition(f"the model {model_dir} has no chat template", field="messages")
    try:
        text = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=add_generation_prompt,
                                             tokenize=False)
    except jinja2.TemplateError as exc:  # templates reject e.g. a bad role order with raise_exception
        raise InvalidArgument(f"the chat template refused the messages: {exc}", field="messages") from exc
    except Exception as exc:  # noqa: BLE001 - a template may index into any field a message carries
        raise InvalidArgument(f"the chat template could not render the messages: {type(exc).__name__}: {exc}",
                              field="messages") from exc
    # The template already wrote any BOS it wants; adding special tokens again would double it.
    return list(tokenizer.encode(text, add_special_tokens=False))
