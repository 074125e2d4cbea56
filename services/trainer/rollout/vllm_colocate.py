"""`--vllm_mode colocate`: a vLLM engine inside the trainer process that generates the
rollouts and is kept in sync with the policy: a LoRA policy as a new adapter version at each
sync (the previous one removed), or with `merge_lora` as the base weights plus the adapter's
delta loaded in place (TRL's and ms-swift's default: on CPU vLLM's LoRA kernels gather every
token's adapter weights, which made one rollout's generation about 3x slower than merged);
a full policy by loading its weights in place.

The engine runs in process (VLLM_ENABLE_V1_MULTIPROCESSING=0), so a sync hands the engine
tensors directly, with no copy through another process. Starting it in process touches
process state the trainer owns (vLLM seeds the global RNGs and replaces torch.set_num_threads
with a no-op); both are put back, so the training run stays as seeded as without vLLM."""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import pathlib
import random
import shutil
import tempfile
import time

import numpy as np
import torch

from libs.common import logs
from libs.common.errors import FailedPrecondition, InvalidArgument
from libs.common.vllm_platform import MAX_SEED, lora_slot_rank, platform_defaults
from services.trainer.rollout.base import Completion, Sampling

LOG = logging.getLogger("tuneforge.trainer.rollout.vllm_colocate")


@contextlib.contextmanager
def _trainer_state_kept():
    """Runs the engine's start with the trainer's RNG streams, torch thread count and
    torch.set_num_threads restored afterwards (vLLM's CPU worker resets all three)."""
    python, numpy_state, torch_state = random.getstate(), np.random.get_state(), torch.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    set_num_threads, threads = torch.set_num_threads, torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)
        random.setstate(python)
        np.random.set_state(numpy_state)
        torch.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextlib.contextmanager
def _in_process():
    """vLLM's engine core in this process: the worker's model is this process's module,
    so weights load by reference (and no child process outlives a killed trainer)."""
    before = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = before


def _is_peft(model: torch.nn.Module) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


class ColocateGenerator:
    """One in-process vLLM engine on `model_dir`. `lora_rank` set: the policy is a PEFT model,
    synced as an adapter in one slot of at least that rank, or with `merge_lora` merged into
    the engine's weights (no LoRA in the engine at all); None: a full policy. `max_model_len`
    bounds prompt + completion; `seed` is the engine's own seed (each request carries its own
    seed besides)."""

    name = "vllm-colocate"

    def __init__(self, model_dir: str | os.PathLike, lora_rank: int | None, max_model_len: int, seed: int,
                 merge_lora: bool = False):
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise FailedPrecondition(
                f"--vllm_mode colocate runs one vLLM engine inside a single trainer process; this job has "
                f"{torch.distributed.get_world_size()} processes: use --vllm_mode server (the serving service "
                "generates for every rank)", field="vllm_mode")
        from vllm import LLM

        self.model_dir = pathlib.Path(model_dir)
        self.lora_rank = lora_rank
        self.merge_lora = merge_lora
        self.max_model_len = max_model_len
        self.sync_seconds: float | None = None  # the last sync's wall time
        self._lora = None  # the LoRARequest generations run with (LoRA policy synced at least once)
        self._lora_ids = itertools.count(1)
        self._scratch = pathlib.Path(tempfile.mkdtemp(prefix="tuneforge-colocate-"))
        # vLLM's start writes the process environment (LD_PRELOAD, LOCAL_WORLD_SIZE, VLLM_*), which
        # the trainer's later child processes would inherit: `close` puts those variables back.
        environ = dict(os.environ)
        self._written: dict[str, str | None] = {}
        # vLLM sets up a one-process group in process; tear it down at close unless it was there before.
        self._owns_process_group = not torch.distributed.is_initialized()
        dtype = platform_defaults(None)
        started = time.perf_counter()
        try:
            try:
                with _trainer_state_kept(), _in_process():
                    self.llm = LLM(
                        model=str(self.model_dir), dtype=dtype, seed=seed, max_model_len=max_model_len,
                        enable_lora=lora_rank is not None and not merge_lora, max_loras=1,
                        max_lora_rank=lora_slot_rank(lora_rank) if lora_rank is not None else 16,
                        disable_log_stats=True)
            finally:
                self._written = {key: environ.get(key) for key in set(environ) | set(os.environ)
                                 if os.environ.get(key) != environ.get(key)}
        except (ValueError, TypeError) as exc:  # vLLM's config checks (model, lengths)
            self.close()
            raise FailedPrecondition(f"vLLM refused the colocated engine's configuration: {exc}",
                                     field="vllm_mode") from exc
        except BaseException:
            self.close()
            raise
        self.started_seconds = time.perf_counter() - started
        logs.log(LOG, logging.INFO, "colocated vLLM engine started", model=str(self.model_dir), dtype=dtype,
                 lora_rank=lora_rank, max_model_len=max_model_len, seconds=round(self.started_seconds, 2))

    # -- generation --------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], seeds: list[int], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams

        if len(prompts) != len(seeds):
            raise InvalidArgument(f"{len(prompts)} prompts but {len(seeds)} seeds", field="seeds")
        bad = next((s for s in seeds if not 0 <= s <= MAX_SEED - (sampling.n - 1)), None)
        if bad is not None:  # completion i of n draws with seed + i, in a 64-bit torch generator seed
            raise InvalidArgument(f"seed {bad} is outside [0, 2**64 - n]", field="seeds")
        longest = max((len(p) for p in prompts), default=0)
        if longest + sampling.max_tokens > self.max_model_len:
            raise InvalidArgument(
                f"a prompt of {longest} tokens plus --max_completion_length {sampling.max_tokens} exceeds the "
                f"engine's max_model_len {self.max_model_len}", field="max_completion_length")
        try:
            params = [SamplingParams(n=sampling.n, seed=seed, max_tokens=sampling.max_tokens,
                                     temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k,
                                     stop_token_ids=list(sampling.stop_token_ids)) for seed in seeds]
        except ValueError as exc:  # vLLM's own checks of the sampling parameters
            raise InvalidArgument(f"vLLM refused the sampling parameters: {exc}", field="sampling") from exc
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], params,
                                    lora_request=self._lora, use_tqdm=False)
        return [[Completion(tuple(c.token_ids), c.finish_reason == "stop")
                 for c in sorted(output.outputs, key=lambda c: c.index)] for output in outputs]

    # -- weight sync -------------------------------------------------------------------------

    def sync(self, model: torch.nn.Module, step: int) -> None:
        """Makes the engine generate as `model` does: a PEFT policy becomes the engine's
        adapter (a new version; the previous is removed) or, with `merge_lora`, its merged
        weights are loaded in place, as a plain one's are."""
        started = time.perf_counter()
        if _is_peft(model) and self.merge_lora:
            self._check_lora(model, slot=False)
            self._sync_full(model, merged_weights(model))
        elif _is_peft(model):
            self._sync_lora(model, step)
        else:
            self._sync_full(model)
        self.sync_seconds = time.perf_counter() - started

    def _check_lora(self, model, slot: bool) -> None:
        if self.lora_rank is None:
            raise FailedPrecondition("the policy is a LoRA model but the colocated engine was started for a full "
                                     "policy (lora_rank None)", field="train_type")
        config = model.peft_config[model.active_adapter]
        rank = max([config.r, *(config.rank_pattern or {}).values()])
        if slot and rank > lora_slot_rank(self.lora_rank):
            raise FailedPrecondition(f"the policy's LoRA rank {rank} is above the engine's slot rank "
                                     f"{lora_slot_rank(self.lora_rank)}", field="lora_rank")
        if config.modules_to_save:
            raise FailedPrecondition(
                f"the policy trains whole modules ({', '.join(sorted(config.modules_to_save))}, modules_to_save): "
                "vLLM applies LoRA deltas only; use --use_vllm false or a LoRA without them", field="use_vllm")

    def _sync_lora(self, model, step: int) -> None:
        from vllm.lora.request import LoRARequest

        self._check_lora(model, slot=True)
        lora_id = next(self._lora_ids)
        path = self._scratch / f"{lora_id}"
        model.save_pretrained(str(path), selected_adapters=[model.active_adapter])
        saved = path if (path / "adapter_config.json").exists() else path / model.active_adapter
        # A new name per version: vLLM's prefix cache keys KV blocks by the adapter's name.
        lora = LoRARequest(lora_name=f"policy@{step}.{lora_id}", lora_int_id=lora_id, lora_path=str(saved))
        try:
            loaded = self.llm.llm_engine.add_lora(lora)
        except Exception as exc:  # the worker's error arrives as a bare Exception carrying its message
            shutil.rmtree(path, ignore_errors=True)
            raise FailedPrecondition(f"the colocated engine could not load the policy's adapter: {exc}",
                                     field="use_vllm") from exc
        if not loaded:
            shutil.rmtree(path, ignore_errors=True)
            raise FailedPrecondition("the colocated engine could not load the policy's adapter", field="use_vllm")
        self._drop_lora()
        self._lora = lora

    def _sync_full(self, model: torch.nn.Module, weights=None) -> None:
        # Checkpoint names (the model's own state dict); vLLM's loader fuses q/k/v and gate/up itself.
        if weights is None:
            weights = ((name, tensor.detach()) for name, tensor in model.state_dict().items())
        with torch.no_grad():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        # reload_weights clears the worker's adapters; KV blocks cached under the old weights are stale.
        self._drop_lora()
        if not self.llm.reset_prefix_cache():
            raise FailedPrecondition("the colocated engine could not drop its prefix cache after a weight load")

    def _drop_lora(self) -> None:
        if self._lora is None:
            return
        self.llm.llm_engine.remove_lora(self._lora.lora_int_id)
        shutil.rmtree(pathlib.Path(self._lora.lora_path), ignore_errors=True)
        self._lora = None

    # -- lifecycle ---------------------------------------------------------------------------

    def close(self) -> None:
        """Stops the engine and leaves the process as before it started (no process group,
        the environment as it was, no scratch files). Idempotent."""
        from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()
            del llm
        if self._owns_process_group:  # also after a failed start, which may have set it up
            destroy_model_parallel()
            destroy_distributed_environment()
        for key, value in self._written.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._written = {}
        shutil.rmtree(self._scratch, ignore_errors=True)


def merged_weights(model):
    """(checkpoint name, tensor) of a PEFT policy's base model with its active adapter's delta
    added to each adapted weight, out of place: the policy itself is not touched (PEFT's
    merge_adapter and unmerge_adapter, TRL's route, would round the base weights in place)."""
    from peft.tuners.lora import LoraLayer

    adapter = model.active_adapter
    base = model.get_base_model()
    deltas = {f"{name}.base_layer.weight": module
              for name, module in base.named_modules() if isinstance(module, LoraLayer) and adapter in module.lora_A}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name:
            continue
        if name in deltas:
            with torch.no_grad():
                tensor = tensor + deltas[name].get_delta_weight(adapter).to(tensor.dtype)
        yield name.replace(".base_layer.", "."), tensor.detach()
